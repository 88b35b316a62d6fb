"""A job's life in the engine: the rows of its phase (the optional draft, then the final answers), each prepared
prompt made once, and the answers taken as they stream (trimmed or cleaned) into :class:`~serve.jobs.Result`.

The refine pass is a second phase: the image answers (drafts) are rewritten by the base LM as text rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace

from chat.assistant import Completion, GenerationSettings, Prompt, TokenLogprob, VisionChat
from serve.checks import fit_settings, prepare_prompt
from serve.jobs import Choice, Emit, Event, Job, Result
from serve.postprocess import Cleaner, Trim

REFINE_PROMPT = (
    "A vision model looked at an image and answered a question about it.\n"
    "Question: {question}\n"
    "Its answer: {answer}\n"
    "Rewrite its answer as one clear, complete sentence that answers the question. "
    "Keep every fact from its answer and add none. Reply with the sentence only."
)




class _Choice:
    """One choice's final answer as it streams: trimmed (or cleaned), passed on as events."""

    def __init__(self, job: Job, index: int, emit: Emit) -> None:
        self.index = index
        self.emit = emit
        self.cleaner = Cleaner(job.question, job.post) if job.post.active else None
        self.trimmer = Trim()
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
class Rows:
    """The rows one job puts into a generate() call: each a prepared prompt, its settings and its sink."""

    prompts: list[Prompt]
    settings: list[GenerationSettings]
    sinks: list[Callable[[str, list[TokenLogprob]], None]]


class Work:
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
        self.rows: Rows | None = None

    def start(self, chat: VisionChat) -> None:
        """Prepare the prompt once, check it and the settings against the model, lay out the first phase's rows."""
        job = self.job
        self.start_time = time.perf_counter()
        prompt = prepare_prompt(chat, job.messages, job.images)
        self.prompt_tokens = prompt.length
        settings = fit_settings(chat, job.settings, prompt)
        self.settings = [
            settings if settings.seed is None else replace(settings, seed=settings.seed + i) for i in range(job.n)
        ]
        prompts = [prompt] * job.n
        if job.images and job.refine:
            self.drafting = True
            plain = [replace(s, stop=(), logprobs=False, top_logprobs=0, json_schema=None) for s in self.settings]
            sinks = [lambda piece, _, i=i: self.emit(Event("draft", piece, i)) for i in range(job.n)]
            self.rows = Rows(prompts, plain, sinks)
        else:
            self._final(prompts, self.settings)

    def _final(self, prompts: list[Prompt], settings: list[GenerationSettings]) -> None:
        self.choices = [_Choice(self.job, i, self.emit) for i in range(self.job.n)]
        self.rows = Rows(prompts, settings, [c.feed for c in self.choices])

    def done(self, chat: VisionChat, completions: list[Completion]) -> Result | None:
        """Take this phase's answers: the result, or None when the refine phase is laid out next (text route)."""
        if self.drafting:
            self.drafting = False
            self.drafts = [c.text for c in completions]
            question = self.job.question
            refine = [[{"role": "user", "content": REFINE_PROMPT.format(question=question, answer=d)}] for d in self.drafts]
            prompts = [prepare_prompt(chat, messages, []) for messages in refine]
            self._final(prompts, [fit_settings(chat, s, p) for s, p in zip(self.settings, prompts)])
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
