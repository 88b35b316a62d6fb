"""LM families through training and chat: tiny random-init Qwen3, Gemma-2 and Mistral LMs wearing their family's
real chat template (tests/templates), trained with PhiClip's defaults. The attention implementation is the LM's own
choice (``model.attn_implementation: auto``): Gemma-2 has no SDPA path and trains on eager attention without a
setting."""

from __future__ import annotations

import json
import math

import pytest
from helpers import make_toy_data, tiny_config, tokenizer_with_template
from tiny_models import save_tiny_lm

from chat.assistant import VisionChat
from data.template import IGNORE_INDEX, encode_conversation
from train.run import train

FAMILIES = {"qwen3": "sdpa", "gemma2": "eager", "mistral-nemo": "sdpa"}  # template -> attention chosen
LM_KIND = {"qwen3": "qwen3", "gemma2": "gemma2", "mistral-nemo": "mistral"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory, smol_tokenizer_dir, tiny_clip_dir):
    root = tmp_path_factory.mktemp(request.param)
    lm = save_tiny_lm(root / "lm", tokenizer_with_template(smol_tokenizer_dir, request.param), LM_KIND[request.param])
    run = train(tiny_config(lm, tiny_clip_dir, make_toy_data(root), root / "run", max_steps=2))
    return request.param, run


def test_trains_with_finite_losses(family_run):
    kind, run = family_run
    losses = [row["loss"] for row in json.loads((run / "log_history.json").read_text()) if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_attention_is_the_lms_own_choice(family_run):
    kind, run = family_run
    chat = VisionChat.load(run)
    lm = chat.model.language_model.get_base_model()
    assert lm.config._attn_implementation == FAMILIES[kind]


def test_chat_answers_both_routes(family_run):
    from PIL import Image

    kind, run = family_run
    chat = VisionChat.load(run)
    seen = chat.answer([{"role": "user", "content": "What is it?"}], Image.new("RGB", (32, 32), (200, 10, 10)))
    text = chat.answer([{"role": "user", "content": "Hello?"}])
    assert isinstance(seen, str) and isinstance(text, str)
    ids = chat.prompt_ids([{"role": "user", "content": "Hello?"}])
    if kind == "qwen3":  # non-thinking mode: the prompt ends with the empty think block
        assert chat.tokenizer.decode(ids).endswith("<think>\n\n</think>\n\n")


def test_supervised_tokens_are_the_answers(family_run):
    from data.records import Turn

    kind, run = family_run
    chat = VisionChat.load(run)
    turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat."), Turn("user", "Colour?"),
             Turn("assistant", "Grey.")]
    enc = encode_conversation(chat.processor, turns, n_image_tokens=chat.n_image_tokens, max_length=512)
    supervised = chat.tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
    end = {"qwen3": "<|im_end|>", "gemma2": "<end_of_turn>", "mistral-nemo": "</s>"}[kind]
    assert supervised == f"A cat.{end}Grey.{end}"
