"""Attach LoRA (or QLoRA, when the LM was loaded in NF4) to the language model only."""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from train.config import LoraConfig

_LM_PREFIX = "model.language_model."


def language_model_linears(model: torch.nn.Module) -> list[str]:
    """Leaf names of the LM's linear layers (bitsandbytes' 4-bit linears included)."""
    names = set()
    for name, module in model.named_modules():
        if name.startswith(_LM_PREFIX) and isinstance(module, torch.nn.Linear):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def attach_lora(model: torch.nn.Module, cfg: LoraConfig, gradient_checkpointing: bool) -> PeftModel:
    """Wrap the Llava model with a LoRA adapter on its language model; the projector stays trainable."""
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    leaves = cfg.target_modules or language_model_linears(model)
    if not leaves:
        raise ValueError("no linear layers found in the language model to put LoRA on")
    pattern = rf"{re.escape(_LM_PREFIX)}.*\.({'|'.join(map(re.escape, leaves))})"
    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, peft_config)
