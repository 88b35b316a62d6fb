"""Attach LoRA (QLoRA when the LM was loaded in NF4) to PhiClip's language model only.

The adapter wraps ``model.language_model`` in place, so the model keeps its projector and
tower, and ``model.adapter_disabled()`` gives the base LM back for text-only answers.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

from modeling_phiclip import PhiClipForCausalLM
from runtime.config import LoraConfig


def language_model_linears(lm: torch.nn.Module) -> list[str]:
    """Leaf names of the LM's linear layers (bitsandbytes' 4-bit linears included), its output head excluded."""
    head = lm.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, module in lm.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def _prepare_quantized(model: PhiClipForCausalLM) -> None:
    """PEFT's k-bit preparation (norms in fp32, frozen base); checkpointing is switched on by the caller
    for the whole model (``train.checkpointing``), not here through the LM's deprecated method."""
    if getattr(model.language_model, "is_loaded_in_4bit", False):
        model.language_model = prepare_model_for_kbit_training(model.language_model, use_gradient_checkpointing=False)


def attach_lora(model: PhiClipForCausalLM, cfg: LoraConfig) -> PhiClipForCausalLM:
    """A fresh LoRA adapter on every linear layer of the LM (or ``cfg.target_modules``)."""
    _prepare_quantized(model)
    targets = cfg.target_modules or language_model_linears(model.language_model)
    if not targets:
        raise ValueError("no linear layers found in the language model to put LoRA on")
    peft_config = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model.language_model = get_peft_model(model.language_model, peft_config)
    return model


def load_lora(model: PhiClipForCausalLM, adapter_dir: str) -> PhiClipForCausalLM:
    """An earlier round's adapter, trainable, to continue training it."""
    _prepare_quantized(model)
    model.language_model = PeftModel.from_pretrained(model.language_model, adapter_dir, is_trainable=True)
    return model
