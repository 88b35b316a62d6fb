"""How likely the model finds a given answer: the log-probability of a continuation after a conversation.

Multiple-choice evaluation (lmms-eval's ``loglikelihood`` requests, ``phiclip eval --metric choice``) scores
each candidate answer with :func:`score_continuations` and picks the most likely one.

The continuation is scored as the model was trained to write it: the chat template's assistant turn, that is
the answer's text and the template's end-of-turn marker (the tokens :meth:`PhiClipProcessor.encode_chat` labels).
Each conversation takes the route its generation would: with images, the fine-tuned model; without, the base LM
with the adapter switched off (``text_only_base_lm``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from processing_phiclip import IGNORE_INDEX


@dataclass(frozen=True)
class Score:
    """One continuation's score.

    ``logprob``: the sum of its tokens' log-probabilities (natural log); ``greedy``: whether greedy decoding
    writes exactly these tokens; ``n_tokens``: how many tokens were scored (the answer and end-of-turn marker).
    """

    logprob: float
    greedy: bool
    n_tokens: int


def _scored_row(chat: Any, messages: list[dict], images: list[Any], continuation: str,
                image_markers: bool) -> tuple[list[int], int, int]:
    """Ids of the conversation with ``continuation`` as its last answer, and that answer's token span."""
    messages = chat.with_images(messages, len(images), image_markers)
    full = [*messages, {"role": "assistant", "content": continuation}]
    ids, labels, ends = chat.processor.encode_chat(full, image_markers=image_markers)
    stop = ends[-1]
    start = stop
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return ids, start, stop


def score_continuations(
    chat: Any,
    conversations: list[list[dict]],
    images: list[list[Any]],
    continuations: list[str],
    *,
    image_markers: bool = False,
    batch_size: int = 8,
) -> list[Score]:
    """Score ``continuations[i]`` as the answer to ``conversations[i]`` (a :class:`chat.assistant.VisionChat`'s
    conversation, ending with a user turn) with ``images[i]`` (a list, opened already or anything
    :func:`processing_phiclip.open_image` reads).

    Rows are left-padded in batches of ``batch_size`` per route; only the logits of each batch's last
    positions are computed. Raises ``ValueError`` when the lists' lengths differ, a conversation does not end
    with a user turn, or a row does not fit the LM's context (naming the row).
    """
    if not len(conversations) == len(images) == len(continuations):
        raise ValueError(f"{len(conversations)} conversations, {len(images)} image lists and "
                         f"{len(continuations)} continuations: give one of each per row")
    rows = []
    for i, (messages, row_images, text) in enumerate(zip(conversations, images, continuations)):
        if not messages or messages[-1].get("role") != "user":
            raise ValueError(f"row {i}: the conversation must end with a user turn to be answered")
        ids, start, stop = _scored_row(chat, messages, row_images, text, image_markers)
        length = chat.model.spliced_length(len(ids), len(row_images), chat.n_image_tokens)
        if length > chat.context_length:
            raise ValueError(f"row {i}: {length} positions with the continuation, over the LM's context of "
                             f"{chat.context_length}")
        rows.append((ids, start, stop, row_images))
    scores: list[Score | None] = [None] * len(rows)
    base_lm = chat.model.config.text_only_base_lm and chat.model.has_adapter
    routes = [[i for i, r in enumerate(rows) if r[3]], [i for i, r in enumerate(rows) if not r[3]]]
    for route, group in zip((False, True), routes):
        for at in range(0, len(group), max(1, batch_size)):
            batch = group[at:at + max(1, batch_size)]
            with chat.model.adapter_disabled() if route and base_lm else contextlib.nullcontext():
                for i, score in zip(batch, _score_batch(chat, [rows[i] for i in batch])):
                    scores[i] = score
    return scores


@torch.no_grad()
def _score_batch(chat: Any, rows: list[tuple[list[int], int, int, list[Any]]]) -> list[Score]:
    """Scores of rows (ids, answer start, answer stop, images) in one left-padded forward pass."""
    longest = max(len(ids) for ids, *_ in rows)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids, *_ in rows], device=chat.device)
    mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids, *_ in rows], device=chat.device)
    flat = [image for *_, row_images in rows for image in row_images]
    pixels = chat.processor.image_pixels(flat).to(chat.device) if flat else None
    # Rows end together (left padding) and every image comes before the answer: the last `keep` positions hold
    # each row's answer and the position before it, spliced or not.
    keep = max(len(ids) - start + 1 for ids, start, _, _ in rows)
    logits = chat.model(input_ids=input_ids, pixel_values=pixels, attention_mask=mask, logits_to_keep=keep).logits
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (rows, keep, vocab)
    out = []
    for b, (ids, start, stop, _) in enumerate(rows):
        # token p sits len(ids) - p positions from the row's end; the logits one position earlier predict it
        target = torch.tensor(ids[start:stop], device=chat.device)
        at = torch.tensor([keep - 1 - (len(ids) - p) for p in range(start, stop)], device=chat.device)
        picked = logprobs[b, at]  # (tokens, vocab): the distribution each answer token was drawn from
        out.append(Score(logprob=float(picked.gather(1, target[:, None]).sum()),
                         greedy=bool((picked.argmax(-1) == target).all()), n_tokens=len(target)))
    return out
