"""Tests for the tiny shapes-pretrained CLIP vision tower (demo.tiny_tower)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from demo.shapes import QUESTION_TYPES, render_scene, sample_scene
from demo.tiny_tower import (
    IMAGE_MEAN,
    IMAGE_STD,
    pretrain_shapes_tower,
    tower_config,
)

# A tiny, fast configuration: the test only checks plumbing, not accuracy.
TINY = {
    "seed": 0,
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_seconds": 20.0,
    "max_steps": 40,
    "batch_size": 32,
    "pool_size": 320,
    "eval_every": 20,
    "n_val_images": 64,
    "n_probe_images": 64,
    "progress": False,
}


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tower") / "tiny"
    return out, pretrain_shapes_tower(out, **TINY)


def test_tower_config() -> None:
    cfg = tower_config(64, 16)
    assert cfg.image_size == 64 and cfg.patch_size == 16 and cfg.model_type == "clip_vision_model"
    with pytest.raises(ValueError):
        tower_config(64, 10)


def test_saved_directory_loads(tower: tuple[Path, dict]) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionModel

    out, probe = tower
    assert not probe["reused"]
    model = CLIPVisionModel.from_pretrained(out).eval()
    proc = CLIPImageProcessor.from_pretrained(out)
    assert model.config.image_size == 32 and model.config.patch_size == 8
    assert proc.crop_size["height"] == proc.crop_size["width"] == 32
    assert proc.size["shortest_edge"] == 32
    assert list(proc.image_mean) == list(IMAGE_MEAN) and list(proc.image_std) == list(IMAGE_STD)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("vision_model.") for k in keys)

    image = render_scene(sample_scene(np.random.default_rng(5)), 32)
    pixel_values = proc(images=image, return_tensors="pt")["pixel_values"]
    # the processor reproduces the training normalisation exactly
    manual = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixel_values[0], manual, atol=1e-5, rtol=0)
    with torch.no_grad():
        hs = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert hs[-1].shape == (1, 1 + (32 // 8) ** 2, 32)
    assert probe["num_tokens"] == 1 + (32 // 8) ** 2


def test_probe_json_and_loss_decreases(tower: tuple[Path, dict]) -> None:
    out, probe = tower
    stored = json.loads((out / "probe.json").read_text())
    assert set(stored["accuracy"]) == set(QUESTION_TYPES)
    assert all(0.0 <= v <= 1.0 for v in stored["accuracy"].values())
    losses = probe["losses"]
    assert len(losses) == probe["steps"] > 10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # colour is trivially learnable: even this tiny run beats chance (1/6)
    assert stored["accuracy_cls"]["color"] > 0.3


def test_reuse_does_not_retrain(tower: tuple[Path, dict]) -> None:
    out, probe = tower
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = pretrain_shapes_tower(out, **TINY)
    assert again["reused"]
    assert again["accuracy"] == probe["accuracy"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
