"""The original recipe's single-token variant: one image token from CLIP's projected embedding.

``CLIPModel.get_image_features`` (pooled CLS, post-layernorm, visual projection) gives one
vector per image; the projector maps it to one LM token. The Llava class reads hidden
states of a tower layer instead, so this variant swaps in a ``LlavaModel`` subclass whose
``get_image_features`` returns the pooled embedding. It trains, saves, loads and chats like
the standard model, but no standard Llava loader can rebuild it, so export refuses it.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionModelWithProjection
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaModel


class PooledImageLlavaModel(LlavaModel):
    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        out = self.vision_tower(pixel_values=pixel_values)
        features = self.multi_modal_projector(out.image_embeds[:, None, :])
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=list(features))


def use_pooled_features(llava: torch.nn.Module, tower: CLIPVisionModelWithProjection) -> None:
    """Turn an assembled Llava model into the single-token variant, in place."""
    inner = llava.model
    inner.__class__ = PooledImageLlavaModel
    inner.vision_tower = tower
    projector = inner.multi_modal_projector
    old = projector.linear_1
    projector.linear_1 = torch.nn.Linear(
        tower.config.projection_dim, old.out_features, bias=old.bias is not None, device=old.weight.device,
        dtype=old.weight.dtype,
    )
