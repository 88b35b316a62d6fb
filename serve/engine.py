"""Queue, routing and the optional refine pass: everything between a checked request and the model.

``Engine`` owns one or more loaded copies of the run (``VisionChat``; each switches its
adapter on or off per call, so copies cannot share weights) and a thread pool with one worker
per copy. Requests wait in the pool's queue; more than ``max_queue`` waiting requests are
refused with "server busy". Generation never runs on the event loop: callers get a
``concurrent.futures.Future`` and, while the answer is generated, :class:`Event` s through a
callback:

- ``draft``: a piece of the image answer being generated, when the refine pass will rewrite it;
- ``delta``: the next piece of the final answer of choice ``index`` (with its tokens' logprobs
  when they were asked for).

Routing is VisionChat's: with images, the fine-tuned model (adapter on); without (typed or
spoken text alone), the base LM with the adapter disabled. A job with ``n`` choices runs its
``n`` rows in one ``generate()`` call, each row with its own settings (seed ``seed + i``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from queue import SimpleQueue

from PIL import Image

from chat.assistant import GenerationSettings, TokenLogprob, VisionChat
from serve.errors import ServeError, bad_request, busy, unprocessable
from serve.postprocess import Cleaner
from serve.postprocess import Options as PostOptions

log = logging.getLogger(__name__)

REFINE_PROMPT = (
    "A vision model looked at an image and answered a question about it.\n"
    "Question: {question}\n"
    "Its answer: {answer}\n"
    "Rewrite its answer as one clear, complete sentence that answers the question. "
    "Keep every fact from its answer and add none. Reply with the sentence only."
)


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


def check_messages(messages: list[dict]) -> None:
    """Roles and order that every chat template accepts; the last turn is the user's question."""
    if not messages:
        raise bad_request("messages is empty; send at least one user message", "messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        if m["role"] == "system" and i != 0:
            raise bad_request("a system message may only come first", f"messages[{i}].role")
    last = messages[-1]
    if last["role"] != "user":
        raise bad_request("the last message must be the user's question", "messages")
    has_image = isinstance(last["content"], list) and any(p.get("type") == "image" for p in last["content"])
    if not text_of(last["content"]).strip() and not has_image:
        raise bad_request("the question is empty: type or say something", "messages")


class _Choice:
    """One choice's final answer as it streams: trimmed (or cleaned), passed on as events."""

    def __init__(self, job: Job, index: int, emit: Emit) -> None:
        self.index = index
        self.emit = emit
        self.cleaner = Cleaner(job.question, job.post) if job.post.active else None
        self.trimmer = _Trim()
        self.out: list[str] = []

    def feed(self, piece: str, logprobs: list[TokenLogprob]) -> None:
        self._send(self.cleaner.feed(piece) if self.cleaner else self.trimmer.feed(piece), logprobs)

    def finish(self) -> str:
        self._send(self.cleaner.finish() if self.cleaner else "", [])
        return "".join(self.out)

    def _send(self, text: str, logprobs: list[TokenLogprob]) -> None:
        if text or logprobs:
            self.out.append(text)
            self.emit(Event("delta", text, self.index, list(logprobs)))


class Engine:
    def __init__(self, chats: list[VisionChat], max_queue: int = 64, model_name: str = "phiclip") -> None:
        if not chats:
            raise ValueError("Engine needs at least one loaded VisionChat")
        self.chats = chats
        self.model_name = model_name
        self.max_queue = max_queue
        self._free: SimpleQueue[VisionChat] = SimpleQueue()
        for chat in chats:
            self._free.put(chat)
        self._pool = ThreadPoolExecutor(max_workers=len(chats), thread_name_prefix="phiclip-generate")
        self._count_lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._ended: Counter[str] = Counter()  # served | failed | cancelled

    @property
    def concurrency(self) -> int:
        return len(self.chats)

    @property
    def context_length(self) -> int:
        return self.chats[0].context_length

    def stats(self) -> dict[str, int]:
        """Jobs now running and waiting, and finished ones by outcome.

        ``served``: answered; ``failed``: ended with an error; ``cancelled``: dropped before they
        started, or whose caller left before the answer was finished.
        """
        with self._count_lock:
            return {
                "running": self._running,
                "waiting": self._waiting,
                "concurrency": self.concurrency,
                "served": self._ended["served"],
                "failed": self._ended["failed"],
                "cancelled": self._ended["cancelled"],
            }

    # submitting ------------------------------------------------------------------------------
    def submit(self, job: Job, emit: Emit | None = None) -> Future:
        """Queue a job; the future gives its :class:`Result` or raises :class:`ServeError`."""
        check_messages(job.messages)
        with self._count_lock:
            if self._waiting >= self.max_queue:
                raise busy(f"server busy: {self._waiting} requests are already waiting; retry shortly")
            self._waiting += 1
        future = self._pool.submit(self._run, job, emit or (lambda event: None))
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # never ran, so never left the waiting count
            with self._count_lock:
                self._waiting -= 1
                self._ended["cancelled"] += 1

    def events(self, job: Job) -> Iterator[Event | Result]:
        """For synchronous callers (the web UI): yields :class:`Event` s, then the :class:`Result`."""
        from queue import Queue

        inbox: Queue = Queue()
        future = self.submit(job, inbox.put)
        future.add_done_callback(lambda _: inbox.put(None))
        try:
            while (event := inbox.get()) is not None:
                yield event
            yield future.result()
        finally:
            job.cancelled.set()  # a caller that stops listening frees its place in the queue

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # running -----------------------------------------------------------------------------------
    def _run(self, job: Job, emit: Emit) -> Result:
        with self._count_lock:
            self._waiting -= 1
            self._running += 1
        chat = self._free.get()
        outcome = "failed"
        try:
            if job.cancelled.is_set():
                outcome = "cancelled"
                raise ServeError("the request was cancelled before it started", 499, "cancelled")
            start = time.perf_counter()
            result = self._answer(chat, job, emit)
            result.seconds = time.perf_counter() - start
            outcome = "cancelled" if job.cancelled.is_set() else "served"
            return result
        finally:
            self._free.put(chat)
            with self._count_lock:
                self._running -= 1
                self._ended[outcome] += 1

    def _answer(self, chat: VisionChat, job: Job, emit: Emit) -> Result:
        prompt_tokens = self._check_prompt(chat, job.messages, len(job.images))
        settings = self._fit(chat, job.settings, prompt_tokens)
        self._check_settings(chat, settings)
        rows = [settings if settings.seed is None else replace(settings, seed=settings.seed + i) for i in range(job.n)]
        drafts: list[str | None] = [None] * job.n
        conversations = [job.messages] * job.n
        images = [job.images] * job.n
        if job.images and job.refine:
            plain = [replace(r, stop=(), logprobs=False, top_logprobs=0, json_schema=None) for r in rows]
            sinks = [lambda piece, _, i=i: emit(Event("draft", piece, i)) for i in range(job.n)]
            done = chat.complete(conversations, images, plain, sinks=sinks, cancelled=[job.cancelled] * job.n)
            drafts = [c.text for c in done]
            conversations = [
                [{"role": "user", "content": REFINE_PROMPT.format(question=job.question, answer=d)}] for d in drafts
            ]
            rows = [self._fit(chat, r, self._check_prompt(chat, c, 0)) for r, c in zip(rows, conversations)]
            images = [[] for _ in range(job.n)]
        choices = [_Choice(job, i, emit) for i in range(job.n)]
        done = chat.complete(
            conversations, images, rows, sinks=[c.feed for c in choices], cancelled=[job.cancelled] * job.n
        )
        return Result(
            choices=[
                Choice(c.finish(), d.finish_reason, len(d.token_ids), d.logprobs, draft)
                for c, d, draft in zip(choices, done, drafts)
            ],
            route=job.route,
            prompt_tokens=prompt_tokens,
        )

    @staticmethod
    def _check_prompt(chat: VisionChat, messages: list[dict], n_images: int) -> int:
        limit = chat.context_length
        if sum(len(text_of(m["content"])) for m in messages) > 32 * limit:  # clearly too long: skip tokenizing
            raise unprocessable(
                f"the conversation is far longer than the model's context of {limit} tokens",
                "messages",
                "context_length_exceeded",
            )
        try:
            n = chat.prompt_length(messages, n_images)
        except ValueError as err:  # TemplateError and friends: the template refused the conversation
            raise bad_request(f"the chat template cannot render this conversation: {err}", "messages") from err
        except Exception as err:  # jinja2 raise_exception() in a template
            if type(err).__module__.startswith("jinja2"):
                raise bad_request(f"the chat template cannot render this conversation: {err}", "messages") from err
            raise
        if n >= limit:
            raise unprocessable(
                f"the prompt is {n} tokens; the model's context is {limit} tokens. "
                "Shorten the question or start a new conversation.",
                "messages",
                "context_length_exceeded",
            )
        return n

    @staticmethod
    def _check_settings(chat: VisionChat, settings: GenerationSettings) -> None:
        if not settings.logit_bias:
            return
        vocab = chat.model.get_output_embeddings().weight.shape[0]
        outside = sorted(t for t in settings.logit_bias if not 0 <= t < vocab)
        if outside:
            raise bad_request(
                f"logit_bias names token ids outside the model's vocabulary (0..{vocab - 1}): "
                f"{', '.join(map(str, outside[:5]))}",
                "logit_bias",
            )

    @staticmethod
    def _fit(chat: VisionChat, settings: GenerationSettings, prompt_tokens: int) -> GenerationSettings:
        room = chat.context_length - prompt_tokens
        return replace(settings, max_new_tokens=min(settings.max_new_tokens, room))


class _Trim:
    """Strip leading and trailing whitespace from a stream, as ``str.strip()`` does for the whole."""

    def __init__(self) -> None:
        self._started = False
        self._space = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        body = piece.rstrip()
        if not body:
            self._space += piece
            return ""
        out = self._space + body
        self._space = piece[len(body) :]
        return out
