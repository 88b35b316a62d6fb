"""Configuration of PhiClip: a CLIP/SigLIP vision tower, a Linear-GELU-Linear projector and a causal chat LM.

The base LM and the vision tower are named (Hub id or local path, plus revision) rather than
stored: a PhiClip repository holds only what training changed (projector, LoRA adapter, and
the tower when it was trained). Their configs are kept too, so a model can be built with
random weights, on the meta device, or checked against the parts it loads.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


def _sub_config(value: Any) -> PretrainedConfig | None:
    """A config object from a config, a dict with ``model_type``, or None."""
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        value = dict(value)
        return AutoConfig.for_model(value.pop("model_type"), **value)
    raise TypeError(f"expected a PretrainedConfig or a dict with 'model_type', got {type(value).__name__}")


class PhiClipConfig(PretrainedConfig):
    r"""
    Args:
        text_model (`str`): Hub id or local path of the base causal chat LM.
        text_revision (`str`, *optional*): its revision (branch, tag or commit).
        vision_model (`str`): Hub id or local path of the CLIP or SigLIP model whose vision tower is used.
        vision_revision (`str`, *optional*): its revision.
        text_config, vision_config (`dict` or `PretrainedConfig`): the configs of the LM and of the vision tower.
        vision_feature_layer (`int` or `list[int]`): hidden state(s) of the tower fed to the projector; several
            layers are concatenated along the feature axis.
        vision_feature_select_strategy (`str`): `"default"` drops the CLS token, `"full"` keeps it.
        image_features (`str`): `"patches"` (hidden states, one token per patch) or `"pooled"` (CLIP's projected
            image embedding: one token per image, the original recipe's variant).
        projector_hidden_act (`str`): activation between the projector's two linear layers.
        projector_init_std (`float`): standard deviation of the projector's initial weights.
        image_token (`str`), image_token_id (`int`): the marker that stands for one image in `input_ids`.
        adapter_subfolder (`str`, *optional*): subfolder holding the LoRA adapter (PEFT format); None if none.
        vision_weights (`str`, *optional*): file holding trained vision-tower weights; None when the tower is the
            named one, unchanged.
        text_only_base_lm (`bool`): generation without an image runs the base LM with the adapter switched off.
    """

    model_type = "phiclip"
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    def __init__(
        self,
        text_model: str = "microsoft/Phi-3.5-mini-instruct",
        text_revision: str | None = None,
        vision_model: str = "openai/clip-vit-large-patch14-336",
        vision_revision: str | None = None,
        text_config: dict | PretrainedConfig | None = None,
        vision_config: dict | PretrainedConfig | None = None,
        vision_feature_layer: int | list[int] = -2,
        vision_feature_select_strategy: str = "default",
        image_features: str = "patches",
        projector_hidden_act: str = "gelu",
        projector_init_std: float = 0.02,
        image_token: str = "<image>",
        image_token_id: int | None = None,
        adapter_subfolder: str | None = None,
        vision_weights: str | None = None,
        text_only_base_lm: bool = True,
        **kwargs: Any,
    ) -> None:
        if vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"vision_feature_select_strategy: '{vision_feature_select_strategy}' is not 'default' (drop CLS) or 'full'"
            )
        if image_features not in ("patches", "pooled"):
            raise ValueError(f"image_features: '{image_features}' is not 'patches' or 'pooled'")
        self.text_model = text_model
        self.text_revision = text_revision
        self.vision_model = vision_model
        self.vision_revision = vision_revision
        self.text_config = _sub_config(text_config)
        self.vision_config = _sub_config(vision_config)
        self.vision_feature_layer = vision_feature_layer
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.image_features = image_features
        self.projector_hidden_act = projector_hidden_act
        self.projector_init_std = projector_init_std
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.adapter_subfolder = adapter_subfolder
        self.vision_weights = vision_weights
        self.text_only_base_lm = text_only_base_lm
        super().__init__(**kwargs)

    def get_text_config(self, *args: Any, **kwargs: Any) -> PretrainedConfig:
        """The LM's config: generation utilities and pipelines read vocabulary and lengths from it."""
        return self.text_config if self.text_config is not None else self
