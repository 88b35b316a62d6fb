"""Queue, dynamic batching, routing and the optional refine pass: everything between a checked request
and the model.

``Engine`` owns one or more loaded copies of the run (``VisionChat``; each switches its adapter
on or off per call, so copies cannot share weights) and one worker thread per copy. Requests
wait in one queue; more than ``max_queue`` waiting requests are refused with "server busy".
A worker that is free takes the first waiting request and every other one of the same route
that is waiting (after at most ``batch_wait_ms`` for more to arrive) up to ``max_batch`` rows,
and answers them in one ``generate()`` call: image questions (adapter on) and text-only
questions (base LM, adapter off) never share a call. Each row keeps its own settings through
per-row logits processing (:mod:`chat.rows`), streams its own text as it is generated, and
stops on its own; a caller that goes away ends its row while the batch goes on.

Generation never runs on the event loop: callers get a ``concurrent.futures.Future`` and,
while the answer is generated, :class:`Event` s through a callback:

- ``draft``: a piece of the image answer being generated, when the refine pass will rewrite it;
- ``delta``: the next piece of the final answer of choice ``index`` (with its tokens' logprobs
  when they were asked for).

A job with ``n`` choices puts ``n`` rows in one call (choice i with seed ``seed + i``). The
refine pass is a second phase: the drafts go back to the front of the queue as text rows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from PIL import Image

from chat.assistant import Completion, GenerationSettings, TokenLogprob, VisionChat
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


@dataclass
class _Rows:
    """The rows one job puts into a generate() call."""

    conversations: list[list[dict]]
    images: list[list[Image.Image]]
    settings: list[GenerationSettings]
    sinks: list[Callable[[str, list[TokenLogprob]], None]]


class _Work:
    """A job in the engine: its future, its phase (draft or final) and the rows of that phase."""

    def __init__(self, job: Job, emit: Emit) -> None:
        self.job = job
        self.emit = emit
        self.future: Future = Future()
        self.route = job.route
        self.started = False
        self.start_time = 0.0
        self.prompt_tokens = 0
        self.drafting = False
        self.drafts: list[str | None] = [None] * job.n
        self.choices: list[_Choice] = []
        self.settings: list[GenerationSettings] = []
        self.rows: _Rows | None = None

    def start(self, chat: VisionChat) -> None:
        """Check the prompt and settings against the model and lay out the first phase's rows."""
        job = self.job
        self.start_time = time.perf_counter()
        self.prompt_tokens = Engine._check_prompt(chat, job.messages, len(job.images))
        settings = Engine._fit(chat, job.settings, self.prompt_tokens)
        Engine._check_settings(chat, settings)
        self.settings = [
            settings if settings.seed is None else replace(settings, seed=settings.seed + i) for i in range(job.n)
        ]
        conversations, images = [job.messages] * job.n, [job.images] * job.n
        if job.images and job.refine:
            self.drafting = True
            plain = [replace(s, stop=(), logprobs=False, top_logprobs=0, json_schema=None) for s in self.settings]
            sinks = [lambda piece, _, i=i: self.emit(Event("draft", piece, i)) for i in range(job.n)]
            self.rows = _Rows(conversations, images, plain, sinks)
        else:
            self._final(conversations, images, self.settings)

    def _final(self, conversations: list[list[dict]], images: list[list], settings: list[GenerationSettings]) -> None:
        self.choices = [_Choice(self.job, i, self.emit) for i in range(self.job.n)]
        self.rows = _Rows(conversations, images, settings, [c.feed for c in self.choices])

    def done(self, chat: VisionChat, completions: list[Completion]) -> Result | None:
        """Take this phase's answers: the result, or None when the refine phase is laid out next (text route)."""
        if self.drafting:
            self.drafting = False
            self.drafts = [c.text for c in completions]
            question = self.job.question
            refine = [[{"role": "user", "content": REFINE_PROMPT.format(question=question, answer=d)}] for d in self.drafts]
            settings = [Engine._fit(chat, s, Engine._check_prompt(chat, c, 0)) for s, c in zip(self.settings, refine)]
            self._final(refine, [[] for _ in refine], settings)
            self.route = "text"
            return None
        return Result(
            choices=[
                Choice(c.finish(), d.finish_reason, len(d.token_ids), d.logprobs, draft)
                for c, d, draft in zip(self.choices, completions, self.drafts)
            ],
            route=self.job.route,
            prompt_tokens=self.prompt_tokens,
            seconds=time.perf_counter() - self.start_time,
        )


class Engine:
    def __init__(
        self,
        chats: list[VisionChat],
        max_queue: int = 64,
        model_name: str = "phiclip",
        max_batch: int = 8,
        batch_wait_ms: float = 10.0,
    ) -> None:
        if not chats:
            raise ValueError("Engine needs at least one loaded VisionChat")
        if max_batch < 1 or batch_wait_ms < 0:
            raise ValueError("max_batch must be at least 1 and batch_wait_ms at least 0")
        self.chats = chats
        self.model_name = model_name
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.batch_sizes: Counter[int] = Counter()  # rows per generate() call -> calls
        self._queue: deque[_Work] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._waiting = 0
        self._running = 0
        self._ended: Counter[str] = Counter()  # served | failed | cancelled
        self._workers = [
            threading.Thread(target=self._serve, args=(chat,), name=f"phiclip-generate-{i}", daemon=True)
            for i, chat in enumerate(chats)
        ]
        for worker in self._workers:
            worker.start()

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
        with self._cond:
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
        work = _Work(job, emit or (lambda event: None))
        with self._cond:
            if self._closed:
                raise busy("the server is shutting down")
            if self._waiting >= self.max_queue:
                raise busy(f"server busy: {self._waiting} requests are already waiting; retry shortly")
            self._waiting += 1
            self._queue.append(work)
            self._cond.notify()
        work.future.add_done_callback(lambda future: self._forget_if_cancelled(work))
        return work.future

    def _forget_if_cancelled(self, work: _Work) -> None:
        if not work.future.cancelled():
            return
        with self._cond:  # cancelled while waiting: it never runs
            if work in self._queue:
                self._queue.remove(work)
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
            job.cancelled.set()  # a caller that stops listening frees its place in the queue and its row

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting = list(self._queue)
            self._cond.notify_all()
        for work in waiting:
            if work.started:  # between its draft and its refine pass
                work.future.set_exception(busy("the server is shutting down"))
            else:
                work.future.cancel()

    # batching ----------------------------------------------------------------------------------
    def _serve(self, chat: VisionChat) -> None:
        """One worker per model copy: take a batch, answer it, repeat."""
        while (batch := self._take()) is not None:
            self._answer(chat, batch)

    def _take(self) -> list[_Work] | None:
        """The first waiting job and the waiting ones of its route, up to ``max_batch`` rows; None once closed."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            batch = [self._queue.popleft()]
            rows = batch[0].job.n
            deadline = time.monotonic() + self.batch_wait
            while rows < self.max_batch:
                for work in list(self._queue):
                    if work.route == batch[0].route and rows + work.job.n <= self.max_batch:
                        self._queue.remove(work)
                        batch.append(work)
                        rows += work.job.n
                left = deadline - time.monotonic()
                if rows >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            fresh = sum(not work.started for work in batch)
            self._waiting -= fresh
            self._running += fresh
            return batch

    def _answer(self, chat: VisionChat, batch: list[_Work]) -> None:
        """One generate() call for the batch's rows; then each job's next phase, result or error."""
        ready = []
        for work in batch:
            if not work.started:
                work.started = True
                if not work.future.set_running_or_notify_cancel():  # cancelled after it left the queue
                    self._end(work, "cancelled")
                    continue
                if work.job.cancelled.is_set():
                    self._end(work, "cancelled", ServeError("the request was cancelled before it started", 499,
                                                            "cancelled"))
                    continue
                try:
                    work.start(chat)
                except ServeError as err:
                    self._end(work, "failed", err)
                    continue
            ready.append(work)
        if not ready:
            return
        rows = [work.rows for work in ready]
        try:
            completions = chat.complete(
                [c for r in rows for c in r.conversations],
                [i for r in rows for i in r.images],
                [s for r in rows for s in r.settings],
                sinks=[f for r in rows for f in r.sinks],
                cancelled=[work.job.cancelled for work in ready for _ in work.rows.settings],
            )
        except Exception as err:  # the model failed: every job in the call gets the error
            log.exception("generate() failed for a batch of %d jobs", len(ready))
            for work in ready:
                self._end(work, "failed", err)
            return
        self.batch_sizes[len(completions)] += 1
        at = 0
        for work in ready:
            mine = completions[at : at + len(work.rows.settings)]
            at += len(mine)
            try:
                result = work.done(chat, mine)
            except ServeError as err:
                self._end(work, "failed", err)
                continue
            if result is None:  # the refine phase: back to the front of the queue
                with self._cond:
                    self._queue.appendleft(work)
                    self._cond.notify()
            else:
                self._end(work, "cancelled" if work.job.cancelled.is_set() else "served", result=result)

    def _end(self, work: _Work, outcome: str, error: BaseException | None = None, result: Result | None = None) -> None:
        with self._cond:
            self._running -= 1
            self._ended[outcome] += 1
        if work.future.cancelled():
            return
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)

    # checks ------------------------------------------------------------------------------------
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
