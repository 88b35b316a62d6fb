"""Tiny SigLIP-architecture vision tower pretrained from scratch on synthetic shapes: the model side
(config, image processor, probe heads, saving and probing); :mod:`offline.tower_training` trains it.

The offline demo cannot download a real vision tower, and a random tower is useless,
so :func:`offline.tower_training.pretrain_shapes_tower` trains a small :class:`transformers.SiglipVisionModel`
(no class token, no attention-pooling head: PhiClip reads its hidden states) by
supervised multi-attribute classification (color, shape, count, side) on shapes
rendered in memory (:mod:`offline.shapes`), then saves it as a standard Hugging Face
directory that a Llava model can use as its vision tower:

* ``config.json`` + ``model.safetensors`` (``SiglipVisionModel.save_pretrained``,
  re-keyed to the hub layout ``vision_model.*``);
* ``preprocessor_config.json`` (``CLIPImageProcessor``: bicubic resize of the short
  side and centre crop to ``image_size``, OpenAI CLIP's mean/std, as in training);
* ``probe.json``: held-out accuracy per attribute, measured on the reloaded
  model's ``hidden_states[-1]`` (all patch tokens, before ``post_layernorm``), i.e.
  exactly the features a Llava model reads with ``vision_feature_layer=-1`` and
  ``vision_feature_select_strategy="full"``;
* ``probe_heads.pt``: the linear heads (state dict), for re-probing.

The classification heads read the mean of the last layer's tokens (SigLIP has no
class token), so every attribute is linearly decodable from the features the VLM
projector sees. A square picture reaches the tower as llama.cpp's ``mtmd`` prepares
it (PIL-bicubic resize, then OpenAI CLIP's mean/std), and the pad colour PhiClip
derives from that mean is llama.cpp's: the demo model exports to GGUF exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from offline.shapes import ATTRIBUTES, QUESTION_TYPES, render_scene, sample_scene, scene_labels

__all__ = [
    "IMAGE_MEAN",
    "IMAGE_STD",
    "probe_tower",
    "render_batch",
    "tower_config",
    "tower_image_processor",
]

IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean used to normalise images (after scaling to [0, 1]): OpenAI CLIP's, whose colour
``int(mean * 255)`` = (122, 116, 104) is PhiClip's pad colour and the one llama.cpp hard-codes."""
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std used to normalise images (after scaling to [0, 1]): OpenAI CLIP's."""

FORMAT_VERSION = 2  # 1: CLIP tower, mean 0.5 (a cached one is rebuilt, not reused)
ARCHITECTURE = "siglip"
_PREFIX = "vision_model."
# Seed-stream tags, distinct from the dataset's ([seed, 1..4]) streams.
TRAIN_STREAM, VAL_STREAM, PROBE_STREAM = 101, 102, 103


def tower_config(
    image_size: int = 64,
    patch_size: int = 16,
    hidden_size: int = 128,
    num_hidden_layers: int = 3,
    num_attention_heads: int = 4,
    intermediate_size: int | None = None,
) -> SiglipVisionConfig:
    """Config of the tiny tower (``(image_size/patch_size)**2`` tokens, no class token, no pooling head).

    ``intermediate_size`` defaults to ``4 * hidden_size``. Raises ``ValueError`` when ``patch_size``
    does not divide ``image_size``.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        hidden_act="gelu_pytorch_tanh",
        attention_dropout=0.0,
        vision_use_head=False,
    )


def image_processor_cls() -> type:
    """``CLIPImageProcessor`` (PIL backend when torchvision is absent, without the warning)."""
    if importlib.util.find_spec("torchvision") is None:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor


def tower_image_processor(image_size: int = 64) -> Any:
    """``CLIPImageProcessor`` matching the tower's training preprocessing.

    Resize (shortest edge, PIL bicubic) and center crop to ``image_size``, rescale to
    [0, 1], normalise with :data:`IMAGE_MEAN` / :data:`IMAGE_STD`. A square picture is
    thus resized as llama.cpp's ``mtmd`` resizes it (a Pillow-bicubic port; a picture
    already ``image_size`` square is left as is). It is saved with
    ``image_processor_type = "CLIPImageProcessor"``.
    """
    return image_processor_cls()(
        do_resize=True,
        size={"shortest_edge": image_size},
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        do_convert_rgb=True,
    )


def render_batch(
    rng: np.random.Generator, n: int, image_size: int = 64
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample and render ``n`` scenes.

    Returns ``(images, labels)``: ``uint8`` images of shape ``(n, 3, S, S)`` and
    one ``int64`` label tensor per attribute.
    """
    imgs = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = {k: np.empty(n, dtype=np.int64) for k in QUESTION_TYPES}
    for i in range(n):
        scene = sample_scene(rng)
        imgs[i] = np.asarray(render_scene(scene, image_size))
        for k, v in scene_labels(scene).items():
            labels[k][i] = v
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), {k: torch.from_numpy(v) for k, v in labels.items()}


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


class Heads(nn.Module):
    """One linear head per attribute on the mean of the last layer's tokens."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.ModuleDict({k: nn.Linear(hidden_size, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, last: torch.Tensor) -> dict[str, torch.Tensor]:
        """``last``: ``(batch, tokens, hidden)``; returns logits ``(batch, n_values)`` per attribute."""
        mean_tok = last.mean(dim=1)
        return {k: h(mean_tok) for k, h in self.linear.items()}


def last_layer(model: SiglipVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``hidden_states[-1]`` (pre ``post_layernorm``), as a Llava model reads it."""
    return model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]


@torch.no_grad()
def accuracy(
    model: SiglipVisionModel, heads: Heads, images: torch.Tensor, labels: dict[str, torch.Tensor],
    batch_size: int = 500
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    heads.eval()
    correct = {k: 0 for k in QUESTION_TYPES}
    for s in range(0, len(images), batch_size):
        logits = heads(last_layer(model, normalize(images[s : s + batch_size])))
        for k in QUESTION_TYPES:
            correct[k] += int((logits[k].argmax(-1) == labels[k][s : s + batch_size]).sum())
    model.train(was_training)
    heads.train(was_training)
    return {k: c / len(images) for k, c in correct.items()}


@torch.no_grad()
def probe_tower(
    tower_dir: Path, heads_state: dict[str, torch.Tensor], *, seed: int = 0, n_images: int = 2000
) -> dict[str, Any]:
    """Reload a saved tower and measure its heads on fresh held-out shapes.

    Images go through the saved ``CLIPImageProcessor`` and features are the
    reloaded model's ``hidden_states[-1]`` (the Llava view). Raises ``RuntimeError``
    when the saved tower does not reload cleanly.
    """
    model, info = SiglipVisionModel.from_pretrained(tower_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise RuntimeError(f"saved tower does not reload cleanly: {info}")
    model.eval()
    processor = image_processor_cls().from_pretrained(tower_dir)
    image_size = int(model.config.image_size)
    heads = Heads(model.config.hidden_size)
    heads.load_state_dict(heads_state)
    heads.eval()
    rng = np.random.default_rng([seed, PROBE_STREAM])
    correct = {k: 0 for k in QUESTION_TYPES}
    stds: list[float] = []
    for s in range(0, n_images, 250):
        n = min(250, n_images - s)
        imgs, labels = render_batch(rng, n, image_size)
        pil = [to_pil(im) for im in imgs]
        pixel_values = processor(images=pil, return_tensors="pt")["pixel_values"].float()
        last = last_layer(model, pixel_values)
        stds.append(float(last.std()))
        logits = heads(last)
        for k in QUESTION_TYPES:
            correct[k] += int((logits[k].argmax(-1) == labels[k]).sum())
    return {
        "accuracy": {k: c / n_images for k, c in correct.items()},
        "n_probe_images": n_images,
        "feature_std": float(np.mean(stds)),
        "num_tokens": int(last.shape[1]),
    }


def to_pil(image_chw_u8: torch.Tensor) -> Image.Image:
    return Image.fromarray(image_chw_u8.permute(1, 2, 0).numpy(), "RGB")


def save_tower(model: SiglipVisionModel, out_dir: Path) -> None:
    """``save_pretrained`` with the hub-standard ``vision_model.*`` weight names.

    transformers 5 saves a freshly built ``SiglipVisionModel`` without the
    ``vision_model.`` prefix (it only re-adds it for models loaded from a
    prefixed checkpoint); ``from_pretrained`` accepts both layouts, so the file
    is re-keyed to the layout of hub SigLIP checkpoints, which every loader
    (transformers 4.x included) takes.
    """
    model.save_pretrained(out_dir, safe_serialization=True)
    path = out_dir / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        names = list(f.keys())  # safe_open is not iterable
        tensors = {(k if k.startswith(_PREFIX) else _PREFIX + k): f.get_tensor(k).contiguous() for k in names}
    save_file(tensors, str(path), metadata=metadata)


def finished(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The probe of a complete tower in ``out_dir`` trained with exactly ``params``, else None."""
    probe_path = out_dir / "probe.json"
    try:
        probe = json.loads(probe_path.read_text())
    except (OSError, ValueError):
        return None
    needed = ("config.json", "model.safetensors", "preprocessor_config.json")
    if probe.get("params") != params or not all((out_dir / f).is_file() for f in needed):
        return None
    return probe
