"""transformers' pipeline() on a PhiClip folder: batches mixing image and text chats, return_full_text, a quiet load."""

from __future__ import annotations

import logging

import pytest
from helpers import transformers_log
from PIL import Image

GENERATE = {"max_new_tokens": 6}


@pytest.fixture(scope="module")
def loaded(tiny_run):
    """The pipeline, and every record transformers' own logger wrote while it was built."""
    from transformers import pipeline

    with transformers_log("transformers.pipelines.base") as records:
        pipe = pipeline("image-text-to-text", model=str(tiny_run / "model"), trust_remote_code=True)
    return pipe, records


def test_loading_logs_no_error(loaded):
    _, records = loaded
    assert records and records[0].getMessage().startswith("probe")  # the hook works
    errors = [r.getMessage() for r in records[1:] if r.levelno >= logging.ERROR]
    assert errors == []


def _chat(text: str, image: Image.Image | None = None) -> list[dict]:
    parts = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def _answer(result) -> str:
    return result[0]["generated_text"][-1]["content"]


def test_a_batch_mixing_image_and_text_chats_answers_each_as_alone(loaded):
    pipe, _ = loaded
    red, blue = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (30, 30, 200))
    chats = [_chat("Is it bright?", red), _chat("Say hello."), _chat("What is it?", blue), _chat("Count to three.")]
    batched = pipe(text=chats, batch_size=4, generate_kwargs=GENERATE)
    alone = [pipe(text=chat, generate_kwargs=GENERATE) for chat in chats]
    assert [_answer(b) for b in batched] == [a[0]["generated_text"][-1]["content"] for a in alone]


def test_return_full_text_gives_the_prompt_then_the_answer(loaded):
    pipe, _ = loaded
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    new = pipe(images=image, text="What color is it?", return_full_text=False, generate_kwargs=GENERATE)
    full = pipe(images=image, text="What color is it?", return_full_text=True, generate_kwargs=GENERATE)
    assert new[0]["generated_text"]  # the tiny model says something
    assert full[0]["generated_text"] == "What color is it?" + new[0]["generated_text"]
