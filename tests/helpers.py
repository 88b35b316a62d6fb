"""Test helpers (not fixtures): tiny models and data built offline."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

TEMPLATES = Path(__file__).parent / "templates"


def tokenizer_with_template(base: Path, kind: str):
    """The SmolLM2 tokenizer wearing another family's chat template and special tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if kind == "chatml":
        return tok
    spec = json.loads((TEMPLATES / f"{kind}.json").read_text())
    tok.add_special_tokens({"additional_special_tokens": spec["special_tokens"]})
    tok.chat_template = spec["chat_template"]
    for attr in ("bos_token", "eos_token"):
        if attr in spec:
            setattr(tok, attr, spec[attr])
    return tok


def write_image(path: Path, seed: int, size: int = 40, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)
    return path


def make_toy_data(root: Path) -> tuple[Path, Path]:
    """A small LLaVA JSON with images: multi-turn, text-only, shared ids, placeholder at the end."""
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(12):
        write_image(images / f"img{i}.png", i)
        colour = "bright" if i % 2 else "dark"
        records.append(
            {
                "id": f"r{i // 2}",  # ids repeat, as in LLaVA-Instruct
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs it bright?" if i % 3 else "Is it bright?\n<image>"},
                    {"from": "gpt", "value": f"It is {colour}."},
                    {"from": "human", "value": "Sure?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        )
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]})
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path, images


def tiny_config(lm: Path, clip: Path, data: tuple[Path, Path], out: Path, **train):
    from runtime.config import (
        DataConfig,
        LoraConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
    )

    settings = dict(output_dir=str(out), max_steps=4, batch_size=2, grad_accum=1, logging_steps=1, save_steps=2)
    settings.update(train)
    return RunConfig(
        model=ModelConfig(lm=str(lm), vision=str(clip)),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        data=DataConfig(train=str(data[0]), images=str(data[1]), max_length=128),
        train=TrainConfig(**settings),
    )


# First lines of a script that must run as a Hub user would: without the project on its import path
# (the venv's editable install of PhiClip is switched off), so remote code comes from the model folder.
WITHOUT_PROJECT = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if p not in ("", ".", __PROJECT__)]
for name in ("modeling_phiclip", "configuration_phiclip", "processing_phiclip", "train", "chat"):
    assert importlib.util.find_spec(name) is None, f"project module {name} is importable"
"""


def without_project(root: Path) -> str:
    return WITHOUT_PROJECT.replace("__PROJECT__", repr(str(root)))


@contextlib.contextmanager
def transformers_log(probe_logger: str) -> Iterator[list[logging.LogRecord]]:
    """Every warning or error transformers logs inside the block; the first is a probe logged on
    ``probe_logger`` at error level, so a test can check the hook sees transformers' records."""
    from transformers.utils import logging as hf_logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = hf_logging.get_logger("transformers")  # transformers' root logger does not propagate to Python's
    logger.addHandler(handler)
    try:
        hf_logging.get_logger(probe_logger).error("probe: the hook sees transformers' records")
        yield records
    finally:
        logger.removeHandler(handler)


def phiclip_logits(chat, messages: list[dict], image, adapter: bool, continuation: list[int] = ()):
    """PhiClip's prompt ids (``<image>`` expanded as a Llava checkpoint has it) and its logits, shape
    (positions, vocab), over the prompt and a teacher-forced ``continuation``; ``adapter`` False: the base LM."""
    import torch

    ids = chat.prompt_ids(messages, n_images=int(image is not None)) + list(continuation)
    inputs = {"input_ids": torch.tensor([ids])}
    if image is not None:
        inputs["pixel_values"] = chat.processor.image_pixels([image])
    with torch.no_grad(), (contextlib.nullcontext() if adapter else chat.model.adapter_disabled()):
        logits = chat.model(**inputs).logits[0]
    token = chat.processor.image_token_id
    return [t for i in ids for t in [i] * (chat.n_image_tokens if i == token else 1)], logits
