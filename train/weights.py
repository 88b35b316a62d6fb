"""Trainer checkpoints and continued rounds: the trained parts of a PhiClip model, loaded strictly.

A checkpoint is written by ``PhiClipForCausalLM.save_pretrained`` (projector, adapter, tower
when trained), so checkpoints and finished runs share one layout. Loading into a model that
is being trained goes through here: a missing, unexpected or mis-shaped tensor is an error,
never a silent random init.
"""

from __future__ import annotations

from pathlib import Path

from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights

from modeling_phiclip import ADAPTER_DIR, PROJECTOR_FILE, VISION_FILE, PhiClipForCausalLM


def load_trainable(model: PhiClipForCausalLM, from_dir: str | Path, adapter: bool = True) -> None:
    """Load projector (+ tower, + adapter weights into the already attached adapter), strictly.

    ``adapter=False`` takes only projector and tower, as when a stage-2 run starts from a
    stage-1 run that had no adapter yet.
    """
    src = Path(from_dir)
    model.load_strict(model.projector, src / PROJECTOR_FILE, "projector")
    if (src / VISION_FILE).is_file():
        model.load_strict(model.vision_tower, src / VISION_FILE, "vision tower")
    folder = src / ADAPTER_DIR
    if model.has_adapter and adapter:
        if not folder.is_dir():
            raise FileNotFoundError(f"LoRA adapter missing: {folder}")
        lm = model.language_model
        weights = load_peft_weights(str(folder), device=str(next(lm.parameters()).device))
        expected = set(get_peft_model_state_dict(lm).keys())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(
                f"{folder}: adapter does not match the model "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        set_peft_model_state_dict(lm, weights)
    elif not model.has_adapter and folder.is_dir():
        raise ValueError(f"{folder}: checkpoint has a LoRA adapter but the model has none")
