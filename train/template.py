"""Chat-template rendering and the label mask.

The conversation is rendered with the LM's own chat template. Which characters belong to
an assistant answer is read off the template itself: the text added by the generation
prompt ends where the answer starts, and the answer ends where rendering the conversation
with and without a following user turn stops agreeing, token by token (that is the
end-of-turn marker). Prompt and answer segments are then tokenized separately, so no
marker token is searched for, BOS/EOS handling cannot disagree with the tokenizer, and the
tokens before an answer are exactly those of an inference prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from train.records import IMAGE_PLACEHOLDER, Turn

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


def _shared_end(tokenizer: PreTrainedTokenizerBase, a: str, b: str, start: int) -> int:
    """Character offset where ``a`` and ``b`` stop sharing whole tokens, looking from ``start``.

    Compared token by token, so two different special tokens that happen to share their
    first characters (``<|user|>`` and ``<|endoftext|>``) are told apart.
    """
    ta = tokenizer(a[start:], add_special_tokens=False, return_offsets_mapping=True)
    tb = tokenizer(b[start:], add_special_tokens=False)["input_ids"]
    shared = 0
    for x, y in zip(ta["input_ids"], tb):
        if x != y:
            break
        shared += 1
    return start + (ta["offset_mapping"][shared - 1][1] if shared else 0)


def answer_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every answer plus its end-of-turn marker."""
    full = render(tokenizer, messages, generation_prompt=generation_prompt)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prefix):
            raise TemplateError("chat template renders earlier turns differently once later turns follow")
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        probe = render(tokenizer, messages[: i + 1] + [{"role": "user", "content": _PROBE}], generation_prompt=False)
        answer_at = upto.find(message["content"], len(prefix))
        if answer_at < 0:
            raise TemplateError(f"chat template does not reproduce assistant turn {i} verbatim")
        end = _shared_end(tokenizer, upto, probe, answer_at)
        if not full.startswith(upto[:end]):
            raise TemplateError(f"chat template does not reproduce assistant turn {i} verbatim")
        while end > answer_at + len(message["content"]) and upto[end - 1].isspace():
            end -= 1
        spans.append((len(prefix), end))
    return full, spans


def _tokenize_segments(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[int], list[int]]:
    """Tokenize prompt and answer segments separately: ids, labels, and the token index where each answer ends.

    Tokenizing the text before an answer on its own gives exactly the tokens an inference
    prompt ends with (``"\n\n"`` stays one token instead of merging with the answer's first
    characters), so training and generation see the same boundary.
    """
    ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []
    at = 0
    for start, stop in [*spans, (len(text), len(text))]:
        for piece, supervised in ((text[at:start], False), (text[start:stop], True)):
            if not piece:
                continue
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            ids.extend(piece_ids)
            labels.extend(piece_ids if supervised else [IGNORE_INDEX] * len(piece_ids))
        if stop > start:
            ends.append(len(ids))
        at = stop
    return ids, labels, ends


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    turns: list[Turn],
    *,
    n_image_tokens: int,
    max_length: int,
    system_prompt: str | None = None,
) -> Encoded:
    """Token ids and labels for one conversation: only answers and their end-of-turn token are supervised.

    The image stays one ``<image>`` token in the ids (the model splices its features in), but
    counts as the ``n_image_tokens`` positions it will take against ``max_length``. A
    conversation longer than that loses its last turns (whole Q/A pairs, never part of the
    image); if not even the first answer fits, :class:`TemplateError` says by how much.
    """
    messages = to_messages(turns, system_prompt)
    text, spans = answer_spans(tokenizer, messages)
    if not spans:
        raise TemplateError("no answer: conversation has no assistant turn")
    _check_image(text, spans)
    ids, labels, turn_ends = _tokenize_segments(tokenizer, text, spans)
    extra = max(n_image_tokens - 1, 0) * ids.count(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER))
    n_turns = len(turn_ends)
    if len(ids) + extra > max_length:
        fitting = [end for end in turn_ends if end + extra <= max_length]
        if not fitting:
            raise TemplateError(
                f"too long: first answer ends at position {turn_ends[0] + extra} "
                f"({n_image_tokens} per image), max_length is {max_length}"
            )
        ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]
        n_turns = len(fitting)
    encoded = Encoded(input_ids=ids, labels=labels, n_turns_kept=n_turns)
    if encoded.n_supervised == 0:
        raise TemplateError("no supervised tokens: answers vanished in tokenization")
    return encoded


def _check_image(text: str, spans: list[tuple[int, int]]) -> None:
    """The ``<image>`` placeholder (the model's image token) may stand anywhere but inside an answer."""
    at = text.find(IMAGE_PLACEHOLDER)
    if at >= 0 and any(start <= at < stop for start, stop in spans):
        raise TemplateError("bad placeholder: '<image>' inside an answer")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation ending in the generation prompt, segmented exactly as in training."""
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    text, spans = answer_spans(tokenizer, messages, generation_prompt=True)
    _check_image(text, spans)
    return _tokenize_segments(tokenizer, text, spans)[0]
