"""Training loss over the supervised positions only.

Most positions of a chat sample are prompt, image or padding (about four in five in the demo
data), yet the stock loss runs the LM head, a vocabulary-sized matmul, and a softmax over the
vocabulary at every one of them. Here the trainer asks the model's own forward for the logits at
the positions whose next token is supervised, and gives the LM's own loss function those next
tokens as ``shift_labels``: the same cross-entropy terms, summed over the same tokens and divided
by the same count (``num_items_in_batch`` when the Trainer passes it, else their number) as
``model(**batch).loss``, without computing the rest.

The positions are those of the sequence the LM sees: :meth:`PhiClipForCausalLM.forward` splices
each ``<image>`` token into the image's features (text-only batches are not spliced) and re-pads
the rows on the side it picks; :func:`supervised_targets` reproduces that layout from the ids
alone. transformers reads a boolean ``logits_to_keep`` of the batch's shape as "these positions,
flattened" (``slice_logits_to_keep``), so everything still runs through ``model(...)`` (and so
through DDP/FSDP wrappers).
"""

from __future__ import annotations

import torch

from train.template import IGNORE_INDEX


def supervised_targets(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    image_token_id: int,
    tokens_per_image: int,
    spliced: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the LM's logits predict a supervised token, and those tokens.

    Returns a boolean mask over the LM's input positions (``(batch, spliced length)``) and the
    target ids of its ``True`` positions in row-major order. ``spliced``: whether the forward
    splices this batch (it has images); a spliced row keeps only attended positions, each image
    token taking ``tokens_per_image`` of them, and is padded on the left when the batch is.
    """
    batch, length = input_ids.shape
    if not spliced:
        predicting = labels[:, 1:] != IGNORE_INDEX
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = predicting
        return mask, labels[:, 1:][predicting]
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    is_image = (input_ids == image_token_id) & keep
    width = torch.where(is_image, tokens_per_image, 1) * keep  # spliced positions each token takes
    end = width.cumsum(1)
    start = end - width
    row_length = end[:, -1]
    longest = int(row_length.max())
    if attention_mask is not None and bool(attention_mask[:, -1].all()) and not bool(attention_mask[:, 0].all()):
        start = start + (longest - row_length)[:, None]  # left padding, as the forward picks it
    supervised = (labels != IGNORE_INDEX) & keep & ~is_image & (start > 0)
    rows, cols = supervised.nonzero(as_tuple=True)
    mask = torch.zeros((batch, longest), dtype=torch.bool, device=input_ids.device)
    mask[rows, start[rows, cols] - 1] = True
    return mask, labels[rows, cols]


def supervised_logits_inputs(
    inputs: dict[str, torch.Tensor], *, image_token_id: int, tokens_per_image: int
) -> dict[str, torch.Tensor]:
    """``logits_to_keep`` and ``shift_labels`` to add to a PhiClip training batch (which has ``labels``)."""
    input_ids = inputs["input_ids"]
    mask, targets = supervised_targets(
        input_ids,
        inputs["labels"],
        inputs.get("attention_mask"),
        image_token_id=image_token_id,
        tokens_per_image=tokens_per_image,
        spliced=inputs.get("pixel_values") is not None or bool((input_ids == image_token_id).any()),
    )
    return {"logits_to_keep": mask, "shift_labels": targets}
