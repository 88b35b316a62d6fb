"""Where and in what precision a model runs: the device, the dtype, and NF4 quantization for QLoRA."""

from __future__ import annotations

import torch

from runtime.config import LoraConfig


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are very slow without AVX-512); bf16 on GPUs that have it."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quantization(lora: LoraConfig, dtype: torch.dtype):
    """bitsandbytes NF4 settings for QLoRA, or None."""
    if lora.quantize == "none":
        return None
    if lora.quantize != "nf4":
        raise ValueError(f"lora.quantize: '{lora.quantize}' is not one of none, nf4")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=["lm_head"],
    )
