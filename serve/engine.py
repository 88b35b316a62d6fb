"""Queue, routing and the optional refine pass: everything between a checked request and the model.

``Engine`` owns one or more loaded copies of the run (``VisionChat``; each generates one
answer at a time and switches its adapter on or off per question, so copies cannot share
weights) and a thread pool with one worker per copy. Requests wait in the pool's queue;
more than ``max_queue`` waiting requests are refused with "server busy". Generation never
runs on the event loop: callers get a ``concurrent.futures.Future`` and, while the answer
is generated, events through a callback:

- ``("draft", text)``: the image answer being generated, when the refine pass will rewrite it;
- ``("delta", text)``: the next piece of the final answer.

Routing is VisionChat's: with an image, the fine-tuned model (adapter on); without one
(typed or spoken text alone), the base LM with the adapter disabled.
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

from chat.assistant import GenerationSettings, VisionChat
from serve.errors import ServeError, bad_request, busy, unprocessable
from serve.postprocess import Cleaner
from serve.postprocess import Options as PostOptions

log = logging.getLogger(__name__)

Emit = Callable[[str, str], None]

REFINE_PROMPT = (
    "A vision model looked at an image and answered a question about it.\n"
    "Question: {question}\n"
    "Its answer: {answer}\n"
    "Rewrite its answer as one clear, complete sentence that answers the question. "
    "Keep every fact from its answer and add none. Reply with the sentence only."
)


@dataclass
class Job:
    """One checked question: the conversation so far ending with the user's turn."""

    messages: list[dict[str, str]]
    image: Image.Image | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    refine: bool = False
    post: PostOptions = field(default_factory=PostOptions)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def question(self) -> str:
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass
class Result:
    text: str
    route: str  # "vision" (adapter on) or "text" (base LM)
    prompt_tokens: int
    completion_tokens: int  # token ids generated for the final answer, end-of-sequence included
    finish_reason: str  # "stop" or "length"
    draft: str | None = None  # the image answer before the refine pass
    seconds: float = 0.0


def check_messages(messages: list[dict[str, str]]) -> None:
    """Roles and order that every chat template accepts; the last turn is the user's question."""
    if not messages:
        raise bad_request("messages is empty; send at least one user message", "messages")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant"):
            raise bad_request(f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role")
        if m["role"] == "system" and i != 0:
            raise bad_request("a system message may only come first", f"messages[{i}].role")
    if messages[-1]["role"] != "user":
        raise bad_request("the last message must be the user's question", "messages")
    if not messages[-1]["content"].strip():
        raise bad_request("the question is empty: type or say something", "messages")


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
        future = self._pool.submit(self._run, job, emit or (lambda kind, text: None))
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future) -> None:
        if future.cancelled():  # never ran, so never left the waiting count
            with self._count_lock:
                self._waiting -= 1
                self._ended["cancelled"] += 1

    def events(self, job: Job) -> Iterator[tuple[str, object]]:
        """For synchronous callers (the web UI): yields ``(kind, text)`` events, then ``("result", Result)``."""
        from queue import Queue

        inbox: Queue = Queue()
        future = self.submit(job, lambda kind, text: inbox.put((kind, text)))
        future.add_done_callback(lambda _: inbox.put(("end", None)))
        try:
            while True:
                kind, text = inbox.get()
                if kind == "end":
                    break
                yield kind, text
            yield "result", future.result()
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
        with_image = job.image is not None
        prompt_tokens = self._check_prompt(chat, job.messages, with_image)
        settings = self._fit(chat, job.settings, prompt_tokens)
        draft = None
        if with_image and job.refine:
            pieces = []
            for piece in chat.stream(job.messages, job.image, settings):
                pieces.append(piece)
                emit("draft", piece)
            draft = "".join(pieces).strip()
            refine = [{"role": "user", "content": REFINE_PROMPT.format(question=job.question, answer=draft)}]
            settings = self._fit(chat, settings, self._check_prompt(chat, refine, False))
            messages, image = refine, None
        else:
            messages, image = job.messages, job.image
        stream = chat.stream(messages, image, settings)
        text = self._final(stream, job, emit)
        return Result(
            text=text,
            route="vision" if with_image else "text",
            prompt_tokens=prompt_tokens,
            completion_tokens=len(stream.completion.token_ids),
            finish_reason=stream.completion.finish_reason,
            draft=draft,
        )

    @staticmethod
    def _final(stream: Iterator[str], job: Job, emit: Emit) -> str:
        """Pass the final answer on piece by piece (cleaned if asked); returns the text emitted."""
        cleaner = Cleaner(job.question, job.post) if job.post.active else None
        trimmer = _Trim()
        out = []

        def send(text: str) -> None:
            if text:
                out.append(text)
                emit("delta", text)

        for piece in stream:
            send(cleaner.feed(piece) if cleaner else trimmer.feed(piece))
        send(cleaner.finish() if cleaner else "")
        return "".join(out)

    @staticmethod
    def _check_prompt(chat: VisionChat, messages: list[dict[str, str]], with_image: bool) -> int:
        limit = chat.context_length
        if sum(len(m["content"]) for m in messages) > 32 * limit:  # clearly too long: skip tokenizing
            raise unprocessable(
                f"the conversation is far longer than the model's context of {limit} tokens",
                "messages",
                "context_length_exceeded",
            )
        try:
            n = chat.prompt_length(messages, with_image)
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
