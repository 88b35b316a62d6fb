"""Assemble a new ``PhiClipForCausalLM`` and its processor from a vision tower and a causal chat LM.

The parts are loaded by Hub name or local path (``offline:NAME`` for the offline demo's
models); the config records those names, so the saved model references them instead of
storing their weights. The projector starts from a fixed-seed normal init.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from configuration_phiclip import PhiClipConfig
from data.template import check_chat_template
from modeling_phiclip import SIGLIP2_NAFLEX, PhiClipForCausalLM, load_vision_tower
from processing_phiclip import IMAGE_TOKEN, PhiClipProcessor
from runtime.config import LoraConfig, ModelConfig
from runtime.devices import default_device, pick_dtype, quantization
from runtime.models import resolve


@dataclass
class Built:
    """A freshly assembled model with the processor that feeds it."""

    model: PhiClipForCausalLM
    processor: PhiClipProcessor
    n_image_tokens: int

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def image_processor(self):
        return self.processor.image_processor


def _vision_config(path: str, revision: str | None):
    """The vision part of a CLIP/SigLIP checkpoint's config (full CLIP configs hold it as ``vision_config``)."""
    config = AutoConfig.from_pretrained(path, revision=revision)
    if config.model_type in ("clip", "siglip", "siglip2"):
        config = config.vision_config
    if config.model_type == "siglip2_vision_model":
        raise ValueError(f"{path}: {SIGLIP2_NAFLEX}")
    if config.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(f"vision tower {path}: model type '{config.model_type}' is not CLIP or SigLIP")
    return config


def build_model(
    cfg: ModelConfig, lora: LoraConfig | None = None, device: torch.device | None = None,
    system_prompt: str | None = None,
) -> Built:
    """Load the tower and the LM by name or path and put them in one PhiClip model (frozen; projector fresh)."""
    lora = lora or LoraConfig(enabled=False)
    device = device or default_device()
    dtype = pick_dtype(cfg.dtype, device)
    lm_path = resolve(cfg.lm)
    vision_path = resolve(cfg.vision)
    vision_config = _vision_config(vision_path, cfg.vision_revision)  # an unusable tower fails before anything loads
    processor = PhiClipProcessor.from_parts(
        AutoImageProcessor.from_pretrained(vision_path), AutoTokenizer.from_pretrained(lm_path), system_prompt,
        IMAGE_TOKEN, cfg.image_aspect,
    )
    check_chat_template(processor, system_prompt)  # before the LM loads: a template that cannot train fails first
    quant = quantization(lora, dtype)
    lm_kwargs = {"dtype": dtype}
    if cfg.attn_implementation != "auto":
        lm_kwargs["attn_implementation"] = cfg.attn_implementation
    if quant is not None:
        lm_kwargs["quantization_config"] = quant
        lm_kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    lm = AutoModelForCausalLM.from_pretrained(lm_path, revision=cfg.lm_revision, **lm_kwargs)
    if quant is None:
        lm = lm.to(device)
    lm.generation_config.pad_token_id = processor.tokenizer.pad_token_id

    config = PhiClipConfig(
        text_model=lm_path,
        vision_model=vision_path,
        text_config={k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"},
        vision_config=vision_config.to_dict(),
        image_token=IMAGE_TOKEN,
        image_token_id=processor.image_token_id,
        **cfg.phiclip_fields(),
    )
    if config.vision_config.model_type.startswith("siglip") and cfg.vision_feature_select_strategy == "default":
        raise ValueError("SigLIP towers have no CLS token: set model.vision_feature_select_strategy: full")
    tower = load_vision_tower(config, vision_path, revision=cfg.vision_revision, dtype=dtype).to(device)
    model = PhiClipForCausalLM(config, language_model=lm, vision_tower=tower)
    model.projector.to(device=device, dtype=dtype)
    model.generation_config = lm.generation_config
    model.requires_grad_(False)
    return Built(model=model, processor=processor, n_image_tokens=model.image_token_count())
