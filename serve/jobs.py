"""The server's request data: a checked question (:class:`Job`), the pieces of its answer as they stream
(:class:`Event`) and its answers (:class:`Result`, one :class:`Choice` per answer)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from chat.assistant import GenerationSettings, TokenLogprob
from serve.postprocess import Options as PostOptions


@dataclass
class Event:
    """A piece of an answer as it is generated (see the module docstring)."""

    kind: str  # "draft" | "delta"
    text: str
    index: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)


Emit = Callable[[Event], None]


def text_of(content: str | list[dict]) -> str:
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    return "\n".join(p.get("text", "") for p in content if p.get("type") == "text")


@dataclass
class Job:
    """One checked question: the conversation so far, ending with the user's turn.

    A message's content is a string or a list of parts (``{"type": "image"}`` for each image,
    in order, and ``{"type": "text", "text": ...}``); ``images`` are the conversation's images
    in the order of its image parts. ``n``: answers to generate (OpenAI's choices).
    """

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    n: int = 1
    refine: bool = False
    post: PostOptions = field(default_factory=PostOptions)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def question(self) -> str:
        return next((text_of(m["content"]) for m in reversed(self.messages) if m["role"] == "user"), "")

    @property
    def route(self) -> str:
        return "vision" if self.images else "text"


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    completion_tokens: int  # token ids generated for the final answer, end-of-sequence included
    logprobs: list[TokenLogprob] | None = None
    draft: str | None = None  # the image answer before the refine pass


@dataclass
class Result:
    choices: list[Choice]
    route: str  # "vision" (adapter on) or "text" (base LM)
    prompt_tokens: int
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def finish_reason(self) -> str:
        return self.choices[0].finish_reason

    @property
    def draft(self) -> str | None:
        return self.choices[0].draft

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)
