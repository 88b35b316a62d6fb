"""Tiny models and a tiny trained run for the tests and the server's load benchmark (seconds to build, offline).

The language model is a 2-layer random-init Llama wearing SmolLM2's real tokenizer and chat
template; the vision tower a 2-layer CLIP at 32x32 pixels. Four training steps on twelve
random images give a run directory with projector and LoRA adapter, which is all the server
needs. Its answers are gibberish, but deterministic under greedy decoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

LM_KINDS = ("llama", "phi3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "smollm3")


def save_tiny_lm(out: Path, tokenizer, kind: str = "llama", initializer_range: float = 0.02) -> Path:
    """A 2-layer random-init LM of one of ``LM_KINDS`` (Llama with tied embeddings) sized for ``tokenizer``, saved
    with it."""
    import torch
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SmolLM3Config,
        SmolLM3ForCausalLM,
    )

    if kind not in LM_KINDS:
        raise ValueError(f"tiny LM kind '{kind}' is not one of {', '.join(LM_KINDS)}")

    torch.manual_seed(0)
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "initializer_range": initializer_range,
    }
    if kind == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**common))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16))
    elif kind == "mistral":  # sliding-window attention, untied head
        model = MistralForCausalLM(MistralConfig(**common, head_dim=16, sliding_window=256))
    elif kind == "gemma2":  # logit soft-capping, sliding windows, eager attention only
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16))
    elif kind == "gemma3":  # scaled embeddings, q/k norms, local and global layers
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64))
    elif kind == "qwen2":  # biased q/k/v projections
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif kind == "smollm3":  # no RoPE on every fourth layer
        model = SmolLM3ForCausalLM(SmolLM3Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def save_tiny_clip(out: Path) -> Path:
    """A 2-layer random-init CLIP vision tower at 32x32 pixels (16 patches of 8x8), with its processor."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=16,
    )
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return Path(out)


TOWER_KINDS = ("clip", "siglip", "siglip2", "siglip2-naflex")


def save_tiny_tower(out: Path, kind: str) -> Path:
    """A tiny random-init vision checkpoint as the Hub ships one: the full two-tower model (text tower included) with
    its own image processor, 32x32 pixels in 8x8 patches. ``siglip2`` is a fixed-resolution SigLIP2 release (model
    type ``siglip``, bilinear resize); ``siglip2-naflex`` the variable-resolution one (model type ``siglip2``)."""
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
    )

    torch.manual_seed(0)
    text = {"vocab_size": 100, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "patch_size": 8}
    if kind == "clip":
        CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "image_size": 32}, projection_dim=16)
                  ).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    elif kind in ("siglip", "siglip2"):
        SiglipModel(SiglipConfig(text_config=text, vision_config={**vision, "image_size": 32})).save_pretrained(out)
        resample = 2 if kind == "siglip2" else 3  # PIL bilinear / bicubic, as each release's preprocessor has it
        SiglipImageProcessor(size={"height": 32, "width": 32}, resample=resample).save_pretrained(out)
    elif kind == "siglip2-naflex":
        Siglip2Model(Siglip2Config(text_config=text, vision_config={**vision, "num_patches": 16})).save_pretrained(out)
        Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(out)
    else:
        raise ValueError(f"tiny tower kind '{kind}' is not one of {', '.join(TOWER_KINDS)}")
    return Path(out)


def tiny_backbones(out: Path, tokenizer_dir: str | Path | None = None) -> tuple[Path, Path]:
    """A tiny Llama (SmolLM2 tokenizer) and a tiny CLIP tower under ``out``; returns their folders."""
    from transformers import AutoTokenizer

    out = Path(out)
    if tokenizer_dir is None:
        from runtime.models import SMOLLM2, resolve

        tokenizer_dir = resolve(f"offline:{SMOLLM2}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # the default 0.02 makes a random LM answer nothing but newlines
    lm = save_tiny_lm(out / "lm", tokenizer, initializer_range=0.2)
    return lm, save_tiny_clip(out / "clip")


def build_tiny_run(out: Path, lm_dir: str | Path, vision_dir: str | Path, steps: int = 4) -> Path:
    """Train ``steps`` steps on random images; returns the run directory (``out / 'run'``)."""
    from runtime.config import (
        DataConfig,
        LoraConfig,
        ModelConfig,
        RunConfig,
        TrainConfig,
    )
    from train.run import train

    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"img{i}.png")
        colour = "bright" if i % 2 else "dark"
        records.append(
            {
                "id": f"r{i}",
                "image": f"img{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs it bright?"},
                    {"from": "gpt", "value": f"It is {colour}."},
                ],
            }
        )
    records.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    )
    (out / "train.json").write_text(json.dumps(records))
    cfg = RunConfig(
        model=ModelConfig(lm=str(lm_dir), vision=str(vision_dir)),
        lora=LoraConfig(r=4, alpha=8),
        data=DataConfig(train=str(out / "train.json"), images=str(images), max_length=128),
        train=TrainConfig(
            output_dir=str(out / "run"),
            max_steps=steps,
            batch_size=2,
            grad_accum=1,
            logging_steps=1,
            save_steps=1000,
            gradient_checkpointing=False,
        ),
    )
    return train(cfg)


def save_gemma_sentencepiece_tokenizer(out: Path) -> Path:
    """A ``GemmaTokenizer`` as Gemma's ships: a SentencePiece BPE model (byte fallback, no space prefix handling of
    its own) with ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3 and the turn markers as pieces of the model;
    1000 pieces trained in a second or two on Python's source (benchmarks/reference_shapes.py)."""
    from transformers import AutoTokenizer

    from benchmarks.reference_shapes import train_sentencepiece

    train_sentencepiece(out, 1000, 400_000, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                        eos_piece="<eos>", bos_piece="<bos>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"])
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    AutoTokenizer.from_pretrained(out).save_pretrained(out)
    return Path(out)


def build_family_runs(root: Path, cells: list[tuple[str, str]], tokenizer_dir: str | Path,
                      steps: int = 2) -> dict[tuple[str, str], Path]:
    """Train each (LM template, tower) cell of tests/family_matrix.py ``steps`` steps on toy data; each tiny LM and
    tower is built once. Returns the run directories by cell."""
    from family_matrix import LMS, TOWERS
    from helpers import make_toy_data, tiny_config, tokenizer_with_template

    from train.run import train

    root = Path(root)
    data = make_toy_data(root)
    towers: dict[str, Path] = {}
    lms: dict[str, Path] = {}
    tokenizers = {"smollm2": Path(tokenizer_dir)}
    runs = {}
    for lm, tower in cells:
        kind = TOWERS[tower].kind
        if kind not in towers:
            towers[kind] = save_tiny_tower(root / "towers" / kind, kind)
        if lm not in lms:
            base = LMS[lm].tokenizer
            if base not in tokenizers:
                tokenizers[base] = save_gemma_sentencepiece_tokenizer(root / "tokenizers" / base)
            lms[lm] = save_tiny_lm(root / "lms" / lm, tokenizer_with_template(tokenizers[base], lm), LMS[lm].kind,
                                   initializer_range=0.2)
        cfg = tiny_config(lms[lm], towers[kind], data, root / f"run-{lm}-{tower}", max_steps=steps)
        cfg.model.vision_feature_select_strategy = TOWERS[tower].strategy
        runs[(lm, tower)] = train(cfg)
    return runs
