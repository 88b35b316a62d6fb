"""The engine's accounting: completion tokens, finish reason and job outcomes, on a scripted model."""

from __future__ import annotations

import threading

import pytest

from chat.assistant import Completion, GenerationSettings, Prompt
from serve.engine import Engine
from serve.errors import ServeError
from serve.jobs import Job

HI = [{"role": "user", "content": "Hi"}]
# Three pieces whose text re-tokenizes to anything but three tokens.
WORDS = [(10, " antidisestablishment"), (11, "arian"), (12, "ism")]


class ScriptedChat:
    """Stands in for a VisionChat: "generates" a fixed list of (token id, text piece) pairs for every row."""

    context_length = 512

    def __init__(self, script: list[tuple[int, str]], finish: str = "stop", gate: threading.Event | None = None):
        self.script = script
        self.finish = finish
        self.gate = gate

    def prompt(self, messages, images=None) -> Prompt:
        return Prompt([1, 2, 3, 4], list(images or []), 4)

    def complete_prompts(self, prompts, settings=None, *, sinks=None, cancelled=None) -> list[Completion]:
        if self.gate is not None:
            self.gate.wait(10)
        out = []
        for row in range(len(prompts)):
            for token, piece in self.script:
                if token < 0:
                    raise RuntimeError("the model broke")
                if sinks and sinks[row]:
                    sinks[row](piece, [])
            ids = [token for token, _ in self.script]
            out.append(Completion("".join(p for _, p in self.script), ids, self.finish))
        return out


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_usage_is_the_generated_token_ids_and_the_models_finish_reason(finish):
    engine = Engine([ScriptedChat([*WORDS, (2, "")], finish)])
    result = engine.submit(Job(HI, settings=GenerationSettings(max_new_tokens=4))).result(timeout=10)
    engine.close()
    assert result.text == "antidisestablishmentarianism"
    assert result.completion_tokens == 4  # the three words and the end token, not a re-tokenized count
    assert result.finish_reason == finish


def outcomes(engine: Engine) -> dict[str, int]:
    return {k: engine.stats()[k] for k in ("served", "failed", "cancelled")}


def test_only_answered_jobs_count_as_served():
    gate = threading.Event()
    engine = Engine([ScriptedChat(WORDS, gate=gate)], max_queue=8, max_batch=1)  # one job per call
    first = engine.submit(Job(HI))  # holds the only worker until the gate opens
    left = Job(HI)
    waiting = engine.submit(left)
    dropped = engine.submit(Job(HI))
    assert dropped.cancel()  # never starts
    left.cancelled.set()  # its caller went away while it waited
    gate.set()
    assert first.result(timeout=10).text == "antidisestablishmentarianism"
    with pytest.raises(ServeError, match="cancelled"):
        waiting.result(timeout=10)
    engine.close()
    assert outcomes(engine) == {"served": 1, "failed": 0, "cancelled": 2}

    broken = Engine([ScriptedChat([(10, "a"), (-1, "b")])])
    with pytest.raises(RuntimeError):
        broken.submit(Job(HI)).result(timeout=10)
    with pytest.raises(ServeError, match="context"):
        broken.submit(Job([{"role": "user", "content": "x" * 40_000}])).result(timeout=10)
    broken.close()
    assert outcomes(broken) == {"served": 0, "failed": 2, "cancelled": 0}
