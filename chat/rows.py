"""Answers that share one ``generate()`` call, each row with its own settings, stop strings, seed and stream.

The model's ``generate()`` runs one loop for the whole batch; per-row behaviour plugs into
transformers' public hooks, so rows with different settings share the call and each row
answers as it would alone:

- :class:`RowLogits` (a ``LogitsProcessor``) runs each row's own processors on that row's own
  (unpadded) ids: repetition penalty, OpenAI's presence and frequency penalties, logit bias, a
  JSON grammar, temperature and top-p (transformers' processor classes where one exists). A
  sampled row draws its token from its own ``torch.Generator``, so a seed gives the same text
  whatever else shares the batch; ``generate()`` itself runs greedy and takes that token.
- :class:`RowStreamer` (the streamer ``generate()`` hands each step's tokens to) decodes each
  row, holds back text that could still become a stop string and passes the rest to the row's
  sink as it is generated.
- :class:`RowsFinished` (a ``StoppingCriteria``) ends a row at its end-of-turn token, its stop
  string, its own ``max_new_tokens``, or when its caller has gone; the others go on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from chat.json_grammar import JsonGrammar
from chat.settings import Completion, GenerationSettings, Sink, TokenLogprob, check_settings


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI's penalties: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``.

    ``count[j]`` is how often token ``j`` occurs in the answer so far (the ids after
    ``prompt_length``), not in the prompt.
    """

    def __init__(self, presence: float, frequency: float, prompt_length: int) -> None:
        self.presence = presence
        self.frequency = frequency
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        answer = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, answer, torch.ones_like(answer, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class Row:
    """One answer in a batch: its processors and generator, and its text, tokens and logprobs so far.

    ``decode(ids)``: the text of answer token ids; ``token_text(id)``: one token's text (for
    logprobs); ``eos``: end-of-turn ids; ``grammar``: a JSON constraint (:mod:`chat.json_grammar`)
    or None; ``sink`` gets text as it becomes final; ``cancelled`` ends the row early.
    """

    def __init__(
        self,
        settings: GenerationSettings,
        decode: Callable[[list[int]], str],
        token_text: Callable[[int], str],
        eos: set[int],
        prompt_length: int,
        sink: Sink | None = None,
        cancelled: threading.Event | None = None,
        grammar: LogitsProcessor | None = None,
    ) -> None:
        self.settings = settings
        self.decode = decode
        self.token_text = token_text
        self.eos = eos
        self.sink = sink
        self.cancelled = cancelled
        self.grammar = grammar
        self.processors = _processors(settings, prompt_length, grammar)
        self.seed = settings.seed if settings.seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._generator: torch.Generator | None = None
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._text = ""  # decoded answer so far
        self._sent = 0  # characters of _text handed out
        self._searched = 0  # _text before this offset holds no stop string
        self._longest_stop = max(map(len, settings.stop), default=0)
        self._step_logprobs: torch.Tensor | None = None  # (vocab,) log-softmax of the step being decided
        self._pending: list[tuple[int, TokenLogprob]] = []  # (text offset where the token starts, logprob)
        self.logprobs: list[TokenLogprob] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def plain(self) -> bool:
        """Greedy with nothing to apply or record: the batch's argmax is this row's choice."""
        return not (self.processors or self.settings.sampled or self.settings.logprobs)

    @property
    def text(self) -> str:
        """The answer's text handed out so far (all of it, once finished)."""
        return self._text[: self._sent]

    # deciding the next token ---------------------------------------------------------------------
    def process(self, ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """This row's next-token scores, ``(vocab,)``, from the model's and the row's own ids ``(length,)``."""
        if self.settings.logprobs:
            self._step_logprobs = scores.log_softmax(-1)
        if self.processors:
            scores = self.processors(ids[None], scores[None])[0]
        if not self.settings.sampled:
            return scores
        if self._generator is None:
            self._generator = torch.Generator(device=scores.device).manual_seed(self.seed)
        token = torch.multinomial(scores.softmax(-1), 1, generator=self._generator)
        chosen = torch.full_like(scores, float("-inf"))
        chosen[token] = 0.0
        return chosen

    # taking the token generate() chose -----------------------------------------------------------
    def feed(self, token: int) -> None:
        if self.finished:
            return
        self.token_ids.append(token)
        if self.cancelled is not None and self.cancelled.is_set():
            self._finish("cancelled", len(self._text))
            return
        if token in self.eos:
            self._finish("stop", len(self._text))
            return
        if self.settings.logprobs and self._step_logprobs is not None:
            self._pending.append((len(self._text), self._logprob(token)))
        if self.grammar is not None:
            self.grammar.consume(token)
        self._text = self.decode(self.token_ids)
        stop_at = self._find_stop()
        if stop_at is not None:
            self._finish("stop", stop_at, every_token=False)
        elif len(self.token_ids) >= self.settings.max_new_tokens:
            self._finish("length", len(self._text))
        else:
            self._release(len(self._text) - self._held())

    def end(self) -> None:
        """generate() returned: a row still open ran out of new tokens."""
        if not self.finished:
            self._finish("length", len(self._text))

    def completion(self) -> Completion:
        return Completion(
            self.text.strip(), list(self.token_ids), self.finish_reason or "length",
            list(self.logprobs) if self.settings.logprobs else None,
        )

    # text ------------------------------------------------------------------------------------------
    def _logprob(self, token: int) -> TokenLogprob:
        values = self._step_logprobs
        top = []
        if self.settings.top_logprobs:
            best = values.topk(self.settings.top_logprobs)
            top = [(self.token_text(int(i)), float(v)) for v, i in zip(best.values, best.indices)]
        return TokenLogprob(self.token_text(token), float(values[token]), top)

    def _find_stop(self) -> int | None:
        """Offset in the text where the first stop string starts, if one has appeared."""
        if not self.settings.stop:
            return None
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [i for i in (self._text.find(s, start) for s in self.settings.stop) if i >= 0]
        self._searched = len(self._text)
        return min(hits) if hits else None

    def _held(self) -> int:
        """Characters at the end that may still change: a cut-off character, or the start of a stop string."""
        text = self._text
        broken = len(text) - len(text.rstrip("\ufffd"))
        for k in range(min(len(text), self._longest_stop - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.settings.stop):
                return max(k, broken)
        return broken

    def _release(self, upto: int, every_token: bool = False) -> None:
        """Hand out the text up to ``upto`` with the logprobs of the tokens it starts in (or all tokens)."""
        piece = self._text[self._sent : upto] if upto > self._sent else ""
        released = []
        while self._pending and (every_token or self._pending[0][0] < upto):
            released.append(self._pending.pop(0)[1])
        if not piece and not released:
            return
        self._sent = max(self._sent, upto)
        self.logprobs.extend(released)
        if self.sink is not None:
            self.sink(piece, released)

    def _finish(self, reason: str, upto: int, every_token: bool = True) -> None:
        """End the row: hand out the text up to ``upto``; tokens past a stop string's start are dropped."""
        self.finish_reason = reason
        self._release(upto, every_token)
        self._pending.clear()


def _processors(settings: GenerationSettings, prompt_length: int, grammar: LogitsProcessor | None) -> LogitsProcessorList:
    """The row's own processors, in transformers' order: penalties and bias, the grammar, then the warpers."""
    out = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.presence_penalty or settings.frequency_penalty:
        out.append(PresenceFrequencyPenalty(settings.presence_penalty, settings.frequency_penalty, prompt_length))
    if settings.logit_bias:
        out.append(SequenceBiasLogitsProcessor({(int(t),): float(b) for t, b in settings.logit_bias.items()}))
    if grammar is not None:
        out.append(grammar)
    if settings.sampled:
        if settings.temperature != 1.0:
            out.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1.0:
            out.append(TopPLogitsWarper(settings.top_p))
    return out


class RowLogits(LogitsProcessor):
    """Each row's own processing, on the row's own ids.

    The ids generate() shows processors are the spliced rows (one id per LM position, each
    image's features as padding), left-padded: ``prompt_lengths[r]``, row r's spliced prompt
    length, tells where its ids start.
    """

    def __init__(self, rows: Sequence[Row], prompt_lengths: Sequence[int]) -> None:
        self.rows = rows
        self.prompt_lengths = prompt_lengths
        self.starts: list[int] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.starts is None:  # the first step: the ids are the prompts
            self.starts = [input_ids.shape[1] - n for n in self.prompt_lengths]
        if all(row.plain or row.finished for row in self.rows):
            return scores
        scores = scores.clone()
        for r, row in enumerate(self.rows):
            if not (row.plain or row.finished):
                scores[r] = row.process(input_ids[r, self.starts[r] :], scores[r])
        return scores


class RowStreamer:
    """The streamer ``generate()`` feeds: the prompt first (skipped), then each step's ``(batch,)`` tokens."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for row, token in zip(self.rows, value.reshape(-1).tolist()):
            row.feed(int(token))

    def end(self) -> None:
        for row in self.rows:
            row.end()


class RowsFinished(StoppingCriteria):
    """Ends the rows that have finished (stop string, own token limit) or whose caller has gone."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = [row.finished or (row.cancelled is not None and row.cancelled.is_set()) for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate_rows(
    model,
    tokenizer,
    inputs: dict,
    settings: Sequence[GenerationSettings],
    sinks: Sequence[Sink | None] | None = None,
    cancelled: Sequence[threading.Event | None] | None = None,
    image_tokens: int = 1,
) -> list[Completion]:
    """Run ``model.generate()`` once on the left-padded batch ``inputs``; one :class:`Completion` per row.

    ``image_tokens``: the LM positions one image's features take (``model.image_token_count()``).

    ``settings[i]``, ``sinks[i]`` (gets row i's text as it is generated) and ``cancelled[i]``
    (set it to end row i early) belong to row i. Raises ``ValueError`` for settings the model
    cannot honour: a logit bias outside the vocabulary, an unusable JSON schema.
    """
    mask = inputs["attention_mask"]
    if len(settings) != mask.shape[0]:
        raise ValueError(f"{len(settings)} settings for {mask.shape[0]} rows")
    for s in settings:
        check_settings(s, model)
    eos = model.generation_config.eos_token_id
    eos = tuple([eos] if isinstance(eos, int) else (eos or []))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    images = ((inputs["input_ids"] == model.config.image_token_id) & mask.bool()).sum(1).tolist()  # per row
    lengths = [model.spliced_length(n, k, image_tokens) for n, k in zip(mask.sum(1).tolist(), images)]
    rows = [
        Row(
            s, decode, token_text, set(eos), lengths[r],
            sinks[r] if sinks else None,
            cancelled[r] if cancelled else None,
            JsonGrammar(s.json_schema, tokenizer, eos) if s.json_schema is not None else None,
        )
        for r, s in enumerate(settings)
    ]
    model.generate(
        **inputs,
        max_new_tokens=max(s.max_new_tokens for s in settings),
        do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([RowLogits(rows, lengths)]),
        stopping_criteria=StoppingCriteriaList([RowsFinished(rows)]),
        streamer=RowStreamer(rows),
    )
    return [row.completion() for row in rows]
