"""Chat-template rendering and the label mask.

The conversation is rendered with the LM's own chat template. Which characters belong to
an assistant answer is read off the template itself: the text added by the generation
prompt ends where the answer starts, and the answer ends where rendering the conversation
with and without a following user turn stops agreeing (that is the end-of-turn marker).
Token labels come from the tokenizer's character offsets, so no marker token is searched
for, and BOS/EOS handling can not disagree with the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vlmtune.data.records import IMAGE_PLACEHOLDER, Turn

IGNORE_INDEX = -100
_PROBE = "\u2063probe\u2063"


class TemplateError(ValueError):
    """The record cannot be rendered into a trainable sequence; the message says why."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_turns_kept: int

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def to_messages(turns: list[Turn], system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": t.role, "content": t.content.strip()} for t in turns]
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def answer_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every answer plus its end-of-turn marker."""
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prefix):
            raise TemplateError("chat template renders earlier turns differently once later turns follow")
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        probe = render(tokenizer, messages[: i + 1] + [{"role": "user", "content": _PROBE}], generation_prompt=False)
        end = _common_prefix(upto, probe)
        answer_at = upto.find(message["content"], len(prefix))
        if answer_at < 0 or not full.startswith(upto[:end]):
            raise TemplateError(f"chat template does not reproduce assistant turn {i} verbatim")
        while end > answer_at + len(message["content"]) and upto[end - 1].isspace():
            end -= 1
        spans.append((len(prefix), end))
    return full, spans


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Turn],
    *,
    image_token: str,
    n_image_tokens: int,
    max_length: int,
    system_prompt: str | None = None,
) -> Encoded:
    """Token ids and labels for one conversation: only answers and their end-of-turn token are supervised.

    ``<image>`` expands to ``n_image_tokens`` image tokens. A conversation longer than
    ``max_length`` loses its last turns (whole Q/A pairs, never part of the image); if not
    even the first answer fits, :class:`TemplateError` says by how much.
    """
    messages = to_messages(turns, system_prompt)
    text, spans = answer_spans(tokenizer, messages)
    if not spans:
        raise TemplateError("no answer: conversation has no assistant turn")
    expanded, spans = _expand_image(text, spans, image_token, n_image_tokens)
    enc = tokenizer(expanded, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    turn_ends = []
    span_idx = 0
    for t, (start, _stop) in enumerate(offsets):
        while span_idx < len(spans) and start >= spans[span_idx][1]:
            turn_ends.append(t)
            span_idx += 1
        if span_idx < len(spans) and start >= spans[span_idx][0]:
            labels[t] = ids[t]
    while span_idx < len(spans):
        turn_ends.append(len(ids))
        span_idx += 1
    if len(ids) > max_length:
        fitting = [end for end in turn_ends if end <= max_length]
        if not fitting:
            raise TemplateError(f"too long: first answer ends at token {turn_ends[0]}, max_length is {max_length}")
        cut = fitting[-1]
        ids, labels = ids[:cut], labels[:cut]
        n_turns = len(fitting)
    else:
        n_turns = len(spans)
    encoded = Encoded(input_ids=ids, labels=labels, n_turns_kept=n_turns)
    if encoded.n_supervised == 0:
        raise TemplateError("no supervised tokens: answers vanished in tokenization")
    return encoded


def _expand_image(
    text: str, spans: list[tuple[int, int]], image_token: str, n: int
) -> tuple[str, list[tuple[int, int]]]:
    at = text.find(IMAGE_PLACEHOLDER)
    if at < 0:
        return text, spans
    if any(start <= at < stop for start, stop in spans):
        raise TemplateError("bad placeholder: '<image>' inside an answer")
    replacement = image_token * n
    shift = len(replacement) - len(IMAGE_PLACEHOLDER)
    text = text[:at] + replacement + text[at + len(IMAGE_PLACEHOLDER):]
    return text, [(s + shift, e + shift) if s > at else (s, e) for s, e in spans]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    image_token: str,
    n_image_tokens: int,
) -> list[int]:
    """Token ids of a conversation ending in the generation prompt, as in training."""
    text = render(tokenizer, messages, generation_prompt=True)
    text, _ = _expand_image(text, [], image_token, n_image_tokens)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
