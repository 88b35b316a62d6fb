"""Training sequences: a conversation's ids and labels, fitted to ``max_length``.

Rendering, the label mask and "text is text" belong to the processor
(:meth:`processing_phiclip.PhiClipProcessor.encode_chat`), which every inference prompt also goes
through, so a training prefix and an inference prompt are the same tokens. This module adds what
only training needs: each image counts the positions its features will take, and a conversation
too long for ``max_length`` loses whole question/answer turns (never part of an image).
"""

from __future__ import annotations

from dataclasses import dataclass

from data.records import Turn
from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import IGNORE_INDEX, PhiClipProcessor, TemplateError

__all__ = ["IGNORE_INDEX", "Encoded", "TemplateError", "check_chat_template", "encode_conversation", "to_messages"]

# A conversation every LLaVA-style training set holds: an image question, its answer, a follow-up and its answer.
PROBE = [Turn("user", "<image>\nWhat is in the picture?"), Turn("assistant", "A cat."),
         Turn("user", "What color is it?"), Turn("assistant", "Grey.")]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    n_turns_kept: int
    n_images: int  # image tokens kept: the record's first n_images images

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def to_messages(turns: list[Turn], system_prompt: str | None = None) -> list[dict[str, str]]:
    messages = [{"role": t.role, "content": t.content} for t in turns]
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def check_chat_template(processor: PhiClipProcessor, system_prompt: str | None) -> None:
    """Render :data:`PROBE` (with ``system_prompt``) through the processor before any record is read.

    Raises ``ValueError`` naming the tokenizer, the setting (``data.system_prompt``) and the template's own
    reason when the LM's chat template cannot render a training conversation (Gemma's refuses a system role),
    so a run fails up front instead of skipping every record.
    """
    try:
        processor.encode_chat(to_messages(PROBE, system_prompt), image_markers=True)
    except TemplateError as err:
        setting = " with a system prompt (data.system_prompt; unset it for this LM)" if system_prompt else ""
        name = processor.tokenizer.name_or_path
        raise ValueError(f"{name}: the chat template cannot render a training conversation{setting}: {err}") from err


def encode_conversation(
    processor: PhiClipProcessor,
    turns: list[Turn],
    *,
    n_image_tokens: int,
    max_length: int,
    system_prompt: str | None = None,
) -> Encoded:
    """Token ids and labels for one record: only answers and their end-of-turn token are supervised.

    ``<image>`` in a user turn is an image slot (LLaVA records); anywhere else it is text. Each
    image stays one token in the ids (the model splices its features in) but counts as the
    ``n_image_tokens`` positions it will take against ``max_length``. A conversation longer than
    that loses its last turns (whole Q/A pairs, and the images in them); if not even the first
    answer fits, :class:`TemplateError` says by how much.
    """
    ids, labels, turn_ends = processor.encode_chat(to_messages(turns, system_prompt), image_markers=True)
    if not turn_ends:
        raise TemplateError("no answer: conversation has no assistant turn")
    image_id = processor.image_token_id

    def positions(end: int) -> int:  # LM positions taken by ids[:end], each image counted as its features
        return PhiClipForCausalLM.spliced_length(end, ids[:end].count(image_id), n_image_tokens)

    n_turns = len(turn_ends)
    if positions(len(ids)) > max_length:
        fitting = [end for end in turn_ends if positions(end) <= max_length]
        if not fitting:
            raise TemplateError(
                f"too long: first answer ends at position {positions(turn_ends[0])} "
                f"({n_image_tokens} per image), max_length is {max_length}"
            )
        ids, labels = ids[: fitting[-1]], labels[: fitting[-1]]
        n_turns = len(fitting)
    encoded = Encoded(input_ids=ids, labels=labels, n_turns_kept=n_turns, n_images=ids.count(image_id))
    if encoded.n_supervised == 0:
        raise TemplateError("no supervised tokens: answers vanished in tokenization")
    return encoded
