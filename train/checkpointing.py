"""Activation (gradient) checkpointing on a PhiClip model, through the name each transformers release offers."""

from __future__ import annotations

from modeling_phiclip import PhiClipForCausalLM


def enable_activation_checkpointing(model: PhiClipForCausalLM) -> None:
    """Recompute each LM layer's activations in the backward pass (non-reentrant), inputs requiring grad.

    transformers 5.2x renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns and goes in v6); releases before the rename only have the old one.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
