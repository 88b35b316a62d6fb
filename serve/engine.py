"""Queue and dynamic batching: everything between a checked request and the model.

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
refine pass is a second phase (:mod:`serve.work`): the drafts go back to the front of the queue as text rows.
The request data live in :mod:`serve.jobs`, the checks against the model in :mod:`serve.checks`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future

from chat.assistant import VisionChat
from serve.checks import check_messages
from serve.errors import ServeError, busy
from serve.jobs import Emit, Event, Job, Result
from serve.work import Work

log = logging.getLogger(__name__)

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
        self._queue: deque[Work] = deque()
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
        work = Work(job, emit or (lambda event: None))
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

    def _forget_if_cancelled(self, work: Work) -> None:
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

    def _take(self) -> list[Work] | None:
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

    def _answer(self, chat: VisionChat, batch: list[Work]) -> None:
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
            completions = chat.complete_prompts(
                [p for r in rows for p in r.prompts],
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

    def _end(self, work: Work, outcome: str, error: BaseException | None = None, result: Result | None = None) -> None:
        with self._cond:
            self._running -= 1
            self._ended[outcome] += 1
        if work.future.cancelled():
            return
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)
