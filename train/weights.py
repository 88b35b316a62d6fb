"""Save and load the trained parts of a model: projector, LoRA adapter, optionally the tower.

The same layout is used for the final run directory and for every trainer checkpoint, and
loading is strict: a missing, unexpected or mis-shaped weight is an error, never a silent
random init.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from safetensors.torch import load_file, save_file

PROJECTOR_FILE = "projector.safetensors"
TOWER_FILE = "vision_tower.safetensors"
ADAPTER_DIR = "adapter"


def llava_of(model: torch.nn.Module) -> torch.nn.Module:
    """The LlavaForConditionalGeneration inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_trainable(model: torch.nn.Module, out_dir: str | Path, with_tower: bool = False) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    llava = llava_of(model)
    save_file(_state(llava.model.multi_modal_projector), str(out / PROJECTOR_FILE))
    if with_tower:
        save_file(_state(llava.model.vision_tower), str(out / TOWER_FILE))
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out / ADAPTER_DIR))


def _load_strict(module: torch.nn.Module, path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} weights missing: {path}")
    state = load_file(str(path))
    param = next(module.parameters())
    state = {k: v.to(param.device, param.dtype) for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: {what} weights do not match the model: {err}") from err


def load_trainable(model: torch.nn.Module, from_dir: str | Path, adapter: bool = True) -> None:
    """Load projector (+ tower, + adapter weights into an already attached adapter), strictly.

    ``adapter=False`` takes only projector and tower, as when a stage-2 run starts from a
    stage-1 run that had no adapter yet.
    """
    src = Path(from_dir)
    llava = llava_of(model)
    _load_strict(llava.model.multi_modal_projector, src / PROJECTOR_FILE, "projector")
    if (src / TOWER_FILE).is_file():
        _load_strict(llava.model.vision_tower, src / TOWER_FILE, "vision tower")
    if isinstance(model, PeftModel) and adapter:
        folder = src / ADAPTER_DIR
        if not folder.is_dir():
            raise FileNotFoundError(f"LoRA adapter missing: {folder}")
        weights = load_peft_weights(str(folder), device=str(next(model.parameters()).device))
        expected = set(get_peft_model_state_dict(model).keys())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(
                f"{folder}: adapter does not match the model "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        set_peft_model_state_dict(model, weights)
    elif not isinstance(model, PeftModel) and (src / ADAPTER_DIR).is_dir():
        raise ValueError(f"{src / ADAPTER_DIR}: checkpoint has a LoRA adapter but the model has none")
