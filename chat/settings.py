"""What a caller asks of one answer (:class:`GenerationSettings`) and what it gets back (:class:`Completion`,
with :class:`TokenLogprob` s): OpenAI's chat-completion settings, each honoured or refused by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

MAX_TOP_LOGPROBS = 20


@dataclass
class GenerationSettings:
    """How to generate one answer.

    ``temperature`` 0 means greedy. ``stop``: strings that end the answer (not included in it).
    ``seed``: the sampled text is the same for the same seed. ``presence_penalty`` /
    ``frequency_penalty``: OpenAI's additive penalties over the answer's own tokens
    (``logit -= count * frequency + (count > 0) * presence``). ``logit_bias``: token id -> value
    added to its logit. ``logprobs``: record each token's log-probability (the model's
    log-softmax) and the ``top_logprobs`` most likely alternatives. ``json_schema``: the answer
    is constrained to JSON matching this schema (``{"type": "object"}``: any object).
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: dict | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be 0..{MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0

    def kwargs(self) -> dict:
        """The basic settings as ``generate()`` keywords (for calling the model directly).

        Stop strings, seeds, penalties other than repetition, logit bias, logprobs and JSON
        need per-row processing (:func:`generate_rows`); they raise here rather than vanish.
        """
        extra = [name for name in ("stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias",
                                   "logprobs", "json_schema") if getattr(self, name) not in ((), None, 0.0, {}, False)]
        if extra:
            raise ValueError(f"{', '.join(extra)} cannot be passed as generate() keywords; use VisionChat")
        out = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.sampled:
            out.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)  # no top-k, as OpenAI
        else:
            out.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return out


@dataclass
class TokenLogprob:
    """One generated token: its text, its log-probability, and the most likely tokens at that step."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # (token text, logprob), most likely first


@dataclass
class Completion:
    """One generated answer: its text, the new token ids (up to and including EOS), and why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": end of turn or a stop string; "length": max_new_tokens reached
    logprobs: list[TokenLogprob] | None = None  # with settings.logprobs: the tokens of the text


Sink = Callable[[str, list[TokenLogprob]], None]  # (text piece, logprobs of the tokens behind it)


def check_settings(settings: GenerationSettings, model: torch.nn.Module) -> None:
    """Refuse what the model cannot honour in ``settings``: a logit bias on a token id outside its vocabulary.

    Raises ``ValueError`` naming up to five of the ids and the vocabulary's range.
    """
    vocab = model.get_output_embeddings().weight.shape[0]
    outside = sorted(t for t in settings.logit_bias if not 0 <= t < vocab)
    if outside:
        raise ValueError(f"logit_bias names token ids outside the model's vocabulary (0..{vocab - 1}): "
                         f"{', '.join(map(str, outside[:5]))}")
