"""Tests for the tiny shapes-pretrained SigLIP-architecture vision tower (offline.tower, offline.tower_training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from offline.shapes import QUESTION_TYPES, render_scene, sample_scene
from offline.tower import IMAGE_MEAN, IMAGE_STD, tower_config, tower_image_processor
from offline.tower_training import TowerConfig, pretrain_shapes_tower

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
}


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tower") / "tiny"
    return out, pretrain_shapes_tower(out, TowerConfig(**TINY), progress=False)


def test_tower_config() -> None:
    cfg = tower_config(64, 16)
    assert cfg.image_size == 64 and cfg.patch_size == 16 and cfg.model_type == "siglip_vision_model"
    assert cfg.vision_use_head is False and cfg.hidden_act == "gelu_pytorch_tanh"
    with pytest.raises(ValueError):
        tower_config(64, 10)


def _normalised(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)``: u8 / 255, then OpenAI CLIP's mean/std (the tower's training normalisation)."""
    mean, std = torch.tensor(IMAGE_MEAN).view(3, 1, 1), torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std


def test_normalisation_is_openai_clips_so_the_pad_colour_is_llamacpps(smol_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    from processing_phiclip import PhiClipProcessor

    assert IMAGE_MEAN == (0.48145466, 0.4578275, 0.40821073) and IMAGE_STD == (0.26862954, 0.26130258, 0.27577711)
    processor = PhiClipProcessor(tower_image_processor(64), AutoTokenizer.from_pretrained(smol_tokenizer_dir))
    assert processor.pad_colour == (122, 116, 104)  # clip.cpp's image_pad_color for projector type mlp


@pytest.mark.parametrize("side", [64, 96, 200])
def test_square_pictures_are_resized_with_pil_bicubic_as_llamacpp_does(side: int) -> None:
    """llama.cpp's mtmd leaves a 64x64 picture as is and resizes other squares with a port of Pillow's bicubic."""
    rng = np.random.default_rng(side)
    picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    pixel_values = tower_image_processor(64)(images=picture, return_tensors="pt")["pixel_values"][0]
    expected = picture if side == 64 else picture.resize((64, 64), Image.Resampling.BICUBIC)
    torch.testing.assert_close(pixel_values, _normalised(expected), atol=1e-5, rtol=0)


def test_saved_directory_loads(tower: tuple[Path, dict]) -> None:
    from transformers import AutoImageProcessor, SiglipVisionModel

    out, probe = tower
    assert not probe["reused"]
    model, info = SiglipVisionModel.from_pretrained(out, output_loading_info=True)
    model.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert not hasattr(model, "head")  # no attention-pooling head: PhiClip reads the hidden states
    proc = AutoImageProcessor.from_pretrained(out)
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
    torch.testing.assert_close(pixel_values[0], _normalised(image), atol=1e-5, rtol=0)
    with torch.no_grad():
        hs = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    assert hs[-1].shape == (1, (32 // 8) ** 2, 32)  # one token per patch, no class token
    assert probe["num_tokens"] == (32 // 8) ** 2


def test_probe_json_and_loss_decreases(tower: tuple[Path, dict]) -> None:
    out, probe = tower
    stored = json.loads((out / "probe.json").read_text())
    assert set(stored["accuracy"]) == set(QUESTION_TYPES)
    assert all(0.0 <= v <= 1.0 for v in stored["accuracy"].values())
    losses = probe["losses"]
    assert len(losses) == probe["steps"] > 10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # colour is trivially learnable: even this tiny run beats chance (1/6)
    assert stored["accuracy"]["color"] > 0.3
    assert stored["params"]["architecture"] == "siglip"


def test_reuse_does_not_retrain(tower: tuple[Path, dict]) -> None:
    out, probe = tower
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = pretrain_shapes_tower(out, TowerConfig(**TINY), progress=False)
    assert again["reused"]
    assert again["accuracy"] == probe["accuracy"]
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_tower_cached_with_other_settings_is_rebuilt(tower: tuple[Path, dict], tmp_path: Path) -> None:
    """A cached version-1 (CLIP) tower's probe.json names other settings: the tower is trained again."""
    import shutil

    out, _ = tower
    old = tmp_path / "old"
    shutil.copytree(out, old)
    stored = json.loads((old / "probe.json").read_text())
    stored["params"] = {k: v for k, v in stored["params"].items() if k != "architecture"} | {"version": 1}
    (old / "probe.json").write_text(json.dumps(stored))
    again = pretrain_shapes_tower(old, TowerConfig(**TINY), progress=False)
    assert not again["reused"]
    assert json.loads((old / "probe.json").read_text())["params"]["architecture"] == "siglip"
