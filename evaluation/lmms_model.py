"""PhiClip as an lmms-eval model: ``lmms-eval --model phiclip --model_args pretrained=RUN_OR_REPO``.

Installing PhiClip with its ``[lmms]`` extra registers :func:`manifest` under lmms-eval's ``lmms_eval.models``
entry-point group; lmms-eval then imports this module (nothing else does: it needs lmms-eval installed).

The model loads with PhiClip's own loader (:meth:`chat.assistant.VisionChat.load`: a run folder, a saved
PhiClip folder, or a Hub repo id at ``revision``) and answers through the same code as ``phiclip eval``:

- ``generate_until``: batches of ``batch_size`` per task and generation settings; each question takes its own
  route (with images, the fine-tuned model; without, the base LM with the adapter off). ``<image>`` in a
  question marks where its images go; a question without markers gets them first, as in LLaVA's data.
- ``loglikelihood``: the continuation scored as the answer to the question
  (:func:`chat.scoring.score_continuations`), for multiple-choice tasks. As lmms-eval's own models do, it returns
  the continuation's *negative* log-likelihood (summed over its tokens): lmms-eval's ``multiple_choice`` picks the
  smallest value (``argmin`` in ``lmms_eval/api/task.py``; lmms-eval#370), so a larger-is-better log-probability
  would pick the least likely answer.

A document whose images cannot be opened, whose question does not fit the LM's context, or whose markers do not
match its images is answered with an empty string (or a negative log-likelihood of ``inf``), logged with its task and
document id, and counted in :attr:`PhiClipLmms.skipped`. Generation settings PhiClip cannot honour are refused
by name. Source of the interface: lmms-eval's ``lmms_eval/api/model.py`` (github.com/EvolvingLMMs-Lab/lmms-eval).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm.auto import tqdm

from runtime.hub import quiet_offline_kernel_fetch

quiet_offline_kernel_fetch()  # before chat's imports bring in peft, which imports bitsandbytes

from chat.assistant import GenerationSettings, Prompt, VisionChat
from chat.scoring import score_continuations
from processing_phiclip import ImageError, TemplateError

log = logging.getLogger("phiclip.lmms")

# The lmms-eval generation keywords PhiClip honours (num_beams only at 1: its answers are greedy or sampled).
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams", "repetition_penalty")


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads (group ``lmms_eval.models``): the model id ``phiclip`` and its class."""
    return ModelManifest(model_id="phiclip", simple_class_path="evaluation.lmms_model.PhiClipLmms")


def settings_from(gen_kwargs: dict[str, Any], task: str) -> GenerationSettings:
    """PhiClip's :class:`GenerationSettings` for an lmms-eval task's ``generation_kwargs``.

    ``until`` (a string or list) becomes stop strings; ``do_sample: false`` means greedy whatever the
    temperature. Raises ``ValueError`` naming the task and each keyword PhiClip does not honour.
    """
    unknown = sorted(set(gen_kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise ValueError(f"task {task}: generation setting(s) {', '.join(unknown)} not supported by phiclip "
                         f"(supported: {', '.join(GENERATION_KEYS)})")
    if int(gen_kwargs.get("num_beams", 1)) != 1:
        raise ValueError(f"task {task}: num_beams={gen_kwargs['num_beams']}: phiclip answers greedily or by sampling")
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    sampled = bool(gen_kwargs.get("do_sample", False)) and float(gen_kwargs.get("temperature", 0) or 0) > 0
    return GenerationSettings(
        max_new_tokens=int(gen_kwargs.get("max_new_tokens", 128)),
        temperature=float(gen_kwargs["temperature"]) if sampled else 0.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0) if sampled else 1.0,
        repetition_penalty=float(gen_kwargs.get("repetition_penalty", 1.0)),
        stop=tuple(s for s in until if s),
    )


class PhiClipLmms(lmms):
    """lmms-eval's simple-model interface over :class:`VisionChat`.

    Model arguments: ``pretrained`` (run folder, PhiClip folder or Hub repo id), ``revision`` (Hub revision),
    ``device`` (default: PhiClip's choice), ``batch_size`` (an integer), ``dtype`` (``float32``,
    ``bfloat16``, ``float16`` or ``auto``). Anything else is refused by name.
    """

    is_simple = True

    def __init__(self, pretrained: str, revision: str | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, dtype: str | None = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"phiclip model argument(s) not supported: {', '.join(sorted(unknown))} (supported: "
                             "pretrained, revision, device, batch_size, dtype)")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: phiclip takes a whole number of at least 1 (no 'auto')")
        if max_batch_size is not None:
            raise ValueError("max_batch_size goes with batch_size=auto, which phiclip does not support")
        kwargs: dict[str, Any] = {}
        if revision is not None:
            kwargs["revision"] = revision
        if dtype is not None:
            if dtype not in ("float32", "bfloat16", "float16", "auto"):
                raise ValueError(f"dtype={dtype}: one of float32, bfloat16, float16, auto")
            kwargs["dtype"] = dtype
        self.chat = VisionChat.load(pretrained, device, **kwargs)
        self.batch_size = int(batch_size)
        self.skipped: list[tuple[str, Any, str]] = []  # (task, doc_id, reason)

    def _skip(self, task: str, doc_id: Any, reason: str) -> None:
        self.skipped.append((task, doc_id, reason))
        log.warning("phiclip skipped %s doc %s: %s (%d skipped so far)", task, doc_id, reason, len(self.skipped))

    def _prompt(self, context: str, doc_to_visual, doc_id: Any, task: str, split: str,
                continuation: str | None = None) -> Prompt | None:
        """The document's question and images prepared, or ``None`` (skipped and counted) when it cannot be."""
        try:
            images = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
            prompt = self.chat.prompt([{"role": "user", "content": context}], images, image_markers=True)
        except (ImageError, TemplateError, ValueError, OSError) as err:
            self._skip(task, doc_id, str(err))
            return None
        extra = len(self.chat.tokenizer(continuation, add_special_tokens=False)["input_ids"]) if continuation else 0
        if prompt.length + extra > self.chat.context_length:
            self._skip(task, doc_id, f"{prompt.length + extra} positions, over the LM's context of "
                       f"{self.chat.context_length}")
            return None
        return prompt

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = [""] * len(requests)
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            _, gen_kwargs, _, _, task, _ = request.args
            groups[(task, json.dumps(gen_kwargs, sort_keys=True, default=str))].append(i)
        bar = tqdm(total=len(requests), desc="phiclip generate", unit="question")
        for (task, _), indices in groups.items():
            settings = settings_from(requests[indices[0]].args[1], task)
            prompts = {}
            for i in indices:
                context, _, doc_to_visual, doc_id, _, split = requests[i].args
                if (prompt := self._prompt(context, doc_to_visual, doc_id, task, split)) is not None:
                    prompts[i] = prompt
            bar.update(len(indices) - len(prompts))
            # One route per batch (with images, then text only), similar lengths together: less padding.
            for route in ([i for i in prompts if prompts[i].images], [i for i in prompts if not prompts[i].images]):
                route.sort(key=lambda i: prompts[i].length)
                for at in range(0, len(route), self.batch_size):
                    batch = route[at:at + self.batch_size]
                    for i, done in zip(batch, self.chat.complete_prompts([prompts[i] for i in batch], settings)):
                        answers[i] = done.text
                    bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(negative log-likelihood, greedy) per request, each wrapped in a ``GenerationResult``: lmms-eval 0.7.3's
        evaluator turns a bare (float, bool) pair into its string (``unwrap_generation_output``), which breaks
        every multiple-choice task; the wrapper hands the pair to the task as it is."""
        results: list[tuple[float, bool]] = [(float("inf"), False)] * len(requests)
        rows = []
        for i, request in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            if (prompt := self._prompt(context, doc_to_visual, doc_id, task, split, continuation)) is not None:
                rows.append((i, [{"role": "user", "content": context}], prompt.images, continuation))
        bar = tqdm(total=len(requests), desc="phiclip loglikelihood", unit="choice")
        bar.update(len(requests) - len(rows))
        for at in range(0, len(rows), self.batch_size):
            batch = rows[at:at + self.batch_size]
            scores = score_continuations(self.chat, [r[1] for r in batch], [r[2] for r in batch],
                                         [r[3] for r in batch], image_markers=True, batch_size=self.batch_size)
            for (i, *_), score in zip(batch, scores):
                results[i] = (-score.logprob, score.greedy)
            bar.update(len(batch))
        bar.close()
        return [GenerationResult(text=pair) for pair in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("phiclip does not answer lmms-eval's multi-round tasks; run one question per turn")
