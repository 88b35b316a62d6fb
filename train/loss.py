"""The training batch cut down to what its loss depends on.

The stock loss runs the LM head, a vocabulary-sized matmul, and a softmax over the vocabulary at
every position, yet only the positions whose next token is supervised count (about one in five
with four question/answer turns, one in eight with one). And in a causal LM, the positions after a
row's last such position feed nothing the loss reads (for a chat sample, the answer's end-of-turn
token and the newline after it). So, for a right-padded batch (the :class:`Collator`'s):

- the columns after the last position that predicts a supervised token are cut off;
- the padding mask is dropped: padding sits after each row's text, where causal attention keeps
  it out of every earlier position, so it changes nothing the loss reads, and without a mask the
  attention runs its causal kernel;
- the model's own forward is asked for the logits at the predicting positions only (a boolean
  ``logits_to_keep``, which transformers reads as "these positions, flattened"), and the LM's own
  loss function gets their next tokens as ``shift_labels``.

The result is the same cross-entropy terms, summed over the same tokens and divided by the same
count (``num_items_in_batch`` when the Trainer passes it, else their number) as
``model(**batch).loss``, and everything still runs through ``model(...)`` (so through DDP/FSDP
wrappers). Positions are those of the sequence the LM sees: :meth:`PhiClipForCausalLM.forward`
splices each ``<image>`` token into the image's features (a batch without images is not spliced).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from data.template import IGNORE_INDEX


def reads_boolean_logits_to_keep(language_model: nn.Module) -> bool:
    """Whether the (unwrapped) LM's forward narrows the head's input with transformers' ``slice_logits_to_keep``.

    That helper reads a boolean ``(batch, length)`` mask, as every causal LM in transformers 5 does;
    an LM from older or remote code that slices by an int only would fail on one.
    """
    try:
        return "slice_logits_to_keep" in inspect.getsource(type(language_model).forward)
    except (OSError, TypeError):
        return False


def loss_only_inputs(
    inputs: dict[str, Any], *, image_token_id: int, tokens_per_image: int
) -> dict[str, Any] | None:
    """The batch with only what the loss reads, or None when it is not right-padded or supervises nothing."""
    ids, labels, mask = inputs["input_ids"], inputs["labels"], inputs.get("attention_mask")
    if mask is not None and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return None
    is_image = ids == image_token_id
    # Column c's logits predict the token in column c + 1; image positions are never targets.
    predicting = (labels[:, 1:] != IGNORE_INDEX) & ~is_image[:, 1:]
    if mask is not None:
        predicting &= mask[:, 1:].bool()
    rows, cols = predicting.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return None
    needed = int(cols.max()) + 1
    if bool(is_image[:, needed:].any()):  # an image after the last answer: its pixel_values stay in the batch
        needed = ids.shape[1]
    width = torch.where(is_image[:, :needed], tokens_per_image, 1)
    end = width.cumsum(1)  # end[b, c]: spliced position after column c
    keep = torch.zeros((ids.shape[0], int(end[:, -1].max())), dtype=torch.bool, device=ids.device)
    keep[rows, end[rows, cols] - 1] = True
    out = {key: value for key, value in inputs.items() if key != "attention_mask"}
    out.update(input_ids=ids[:, :needed], labels=labels[:, :needed], logits_to_keep=keep,
               shift_labels=labels[:, 1:][rows, cols])
    return out
