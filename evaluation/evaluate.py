"""Evaluate a run on a LLaVA-format eval set: batched generation, then the metric.

The eval set is LLaVA JSON/JSONL or a Hugging Face dataset (:mod:`data.hf_records`: ``hf://...``,
parquet/arrow files or folders, either row layout). An eval item is a record's last human turn (with the
conversation before it as history)
and its reference answer(s): the gpt turn that follows it, or an ``answers`` list
(VQAv2 style: strings, or objects with an ``answer`` key), which also lets the record end
with the question. An item may carry ``choices`` (candidate answers, one of them the reference): the ``choice`` metric
picks the candidate the model finds most likely (:func:`chat.scoring.score_continuations`) instead of
generating, as multiple-choice benchmarks (MMBench, SEED) do.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from data.images import ImageResolver, RowImage
from data.records import ROLES, BadRecord, Report, parse_record
from data.sources import images_dir, read_source
from data.template import to_messages
from evaluation import metrics as M
from processing_phiclip import IMAGE_TOKEN, ImageError, open_image


@dataclass
class EvalItem:
    id: str
    messages: list[dict[str, str]]  # history + the question, ending with a user turn; <image> marks each image
    references: list[str]
    images: list[Path | RowImage] = field(default_factory=list)  # files, or images embedded in a dataset
    question_type: str | None = None
    choices: list[str] | None = None  # candidate answers for the choice metric

    @property
    def question(self) -> str:
        return self.messages[-1]["content"].replace(IMAGE_TOKEN, "").strip()


@dataclass
class EvalResult:
    metrics: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    report: Report = field(default_factory=Report)
    embedded: dict[str, RowImage] = field(default_factory=dict)  # a row's "image" name -> the dataset image it is


def _answers_field(raw: dict) -> list[str] | None:
    answers = raw.get("answers")
    if answers is None:
        return None
    if isinstance(answers, str):
        answers = [answers]
    out = []
    for a in answers if isinstance(answers, list) else []:
        if isinstance(a, dict):
            a = a.get("answer")
        if isinstance(a, str) and a.strip():
            out.append(a)
    if not out:
        raise BadRecord("bad field: 'answers' holds no answer strings")
    return out


def _choices_field(raw: dict, references: list[str]) -> list[str] | None:
    choices = raw.get("choices")
    if choices is None:
        return None
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise BadRecord("bad field: 'choices' must be a list of two or more answer strings")
    if len(set(choices)) != len(choices):
        raise BadRecord("bad field: 'choices' lists an answer twice")
    if not any(ref in choices for ref in references):
        raise BadRecord("bad field: 'choices' does not hold the reference answer")
    return choices


def _to_item(raw: Any, source: str, index: int, resolver: ImageResolver, images: list[Any] | None = None) -> EvalItem:
    """``images``: the record's images as a dataset row holds them (see :func:`parse_record`)."""
    if not isinstance(raw, dict):
        raise BadRecord(f"not an object: {type(raw).__name__}")
    answers = _answers_field(raw)
    convs = raw.get("conversations")
    if isinstance(convs, list) and convs and isinstance(convs[-1], dict):
        last_role = ROLES.get(convs[-1].get("from", convs[-1].get("role")))
        if last_role == "user":
            if answers is None:
                raise BadRecord("no reference: the record ends with a question and has no 'answers' field")
            # parse_record drops an unanswered last question; give it a stand-in answer to keep it.
            raw = {**raw, "conversations": [*convs, {"from": "gpt", "value": answers[0]}]}
    record = parse_record(raw, source, index, images=images)
    turns = record.turns
    references = answers if answers is not None else [turns[-1].content]
    messages = to_messages(turns[:-1])
    try:
        images = [resolver.resolve(name) if isinstance(name, str) else name for name in record.images]
    except ImageError as err:
        raise BadRecord(str(err)) from err
    qtype = raw.get("question_type", raw.get("category"))
    return EvalItem(
        id=record.id,
        messages=messages,
        references=references,
        images=images,
        question_type=str(qtype) if qtype is not None else None,
        choices=_choices_field(raw, references),
    )


def load_eval_set(data: str | Path, images: str | Path | None = None, limit: int = 0) -> tuple[list[EvalItem], Report]:
    """Eval items of a LLaVA JSON/JSONL file or a dataset; unusable records are skipped and listed in the report.

    ``images``: the folder image file names are relative to (a local dataset's own folder by default).
    """
    resolver = ImageResolver(images_dir(data, images or ""))

    def item(raw: Any, source: str, index: int, row_images: list[Any] | None) -> EvalItem:
        return _to_item(raw, source, index, resolver, images=row_images)

    return read_source(data, item, limit, what="eval data")


def _with_suffix(messages: list[dict[str, str]], suffix: str) -> list[dict[str, str]]:
    if not suffix:
        return messages
    last = dict(messages[-1])
    last["content"] = f"{last['content']}\n{suffix}"
    return [*messages[:-1], last]


def generate_answers(chat, items: list[EvalItem], *, batch_size: int = 8, max_new_tokens: int = 32,
                     prompt_suffix: str = "", report: Report | None = None, progress: bool = True) -> list[str | None]:
    """One answer per item, generated in batches; ``None`` (and a line in ``report``) where the item cannot be
    asked (:func:`_prepare`)."""
    from chat.assistant import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    answers: list[str | None] = [None] * len(items)
    with_image = [i for i, it in enumerate(items) if it.images]
    groups = [with_image, [i for i, it in enumerate(items) if not it.images]]
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=not progress)
    for group in groups:
        # Similar lengths together: less left padding per batch.
        group.sort(key=lambda i: sum(len(m["content"]) for m in items[i].messages))
        for start in range(0, len(group), max(1, batch_size)):
            batch = group[start:start + max(1, batch_size)]
            prompts = _prepare(chat, items, batch, prompt_suffix, report)
            if prompts:
                for i, completion in zip(prompts, chat.complete_prompts(list(prompts.values()), settings)):
                    answers[i] = completion.text
            bar.update(len(batch))
    bar.close()
    return answers


def _prepare(chat, items: list[EvalItem], indices: list[int], prompt_suffix: str, report: Report | None,
             longest_answer: int = 0) -> dict[int, Any]:
    """The :class:`chat.assistant.Prompt` of each item among ``indices`` that can be asked; the others are skipped
    in ``report``: an image that does not open, ``<image>`` markers that do not match the images, or a question
    (plus ``longest_answer`` tokens) longer than the LM's context."""
    prompts = {}
    for i in indices:
        item = items[i]
        try:
            images = [open_image(image.read() if isinstance(image, RowImage) else image) for image in item.images]
            prompt = chat.prompt(_with_suffix(item.messages, prompt_suffix), images, image_markers=True)
        except (ImageError, ValueError) as err:
            if report is not None:
                report.skip(str(item.images[0]) if item.images else "", item.id, str(err))
            continue
        if prompt.length + longest_answer > chat.context_length:
            if report is not None:
                report.skip("", item.id, f"too long: {prompt.length + longest_answer} positions, over the LM's "
                            f"context of {chat.context_length}")
            continue
        prompts[i] = prompt
    return prompts


def choose_answers(chat, items: list[EvalItem], *, batch_size: int = 8, prompt_suffix: str = "",
                   report: Report | None = None, progress: bool = True) -> list[str | None]:
    """Each item's most likely choice; ``None`` (and a line in ``report``) where it cannot be asked.

    Every choice is scored as the item's answer (:func:`chat.scoring.score_continuations`: the sum of its
    tokens' log-probabilities, end-of-turn marker included); the first of equally likely choices wins.
    """
    from chat.scoring import score_continuations

    answers: list[str | None] = [None] * len(items)
    bar = tqdm(total=len(items), desc="eval (choices)", unit="item", disable=not progress)
    per_batch = max(1, batch_size)
    for start in range(0, len(items), per_batch):
        batch = list(range(start, min(start + per_batch, len(items))))
        longest = {i: max(len(chat.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in items[i].choices)
                   for i in batch}
        prompts = {}
        for i in batch:
            prompts.update(_prepare(chat, items, [i], prompt_suffix, report, longest[i]))
        rows = [(i, prompt.images, choice) for i, prompt in prompts.items() for choice in items[i].choices]
        scores = score_continuations(chat, [_with_suffix(items[i].messages, prompt_suffix) for i, _, _ in rows],
                                     [row_images for _, row_images, _ in rows], [c for _, _, c in rows],
                                     image_markers=True, batch_size=per_batch)
        best: dict[int, tuple[float, str]] = {}
        for (i, _, choice), score in zip(rows, scores):
            if i not in best or score.logprob > best[i][0]:
                best[i] = (score.logprob, choice)
        for i, (_, choice) in best.items():
            answers[i] = choice
        bar.update(len(batch))
    bar.close()
    return answers


def score_answers(items: list[EvalItem], answers: list[str], metric: str = "auto") -> EvalResult:
    """Metrics and per-item rows for answers already generated (``metric`` as in :func:`evaluate_run`)."""
    if metric not in M.METRICS:
        raise ValueError(f"metric '{metric}' is not one of {', '.join(M.METRICS)}")
    if metric == "auto":
        metric = M.choose_metric([it.references for it in items])
    rows: list[dict[str, Any]] = []
    for item, answer in zip(items, answers):
        rows.append(
            {
                "id": item.id,
                "question": item.question,
                "answer": answer,
                "references": item.references,
                "image": str(item.images[0]) if item.images else None,
                "images": [str(path) for path in item.images],
                "question_type": item.question_type,
                "exact_match": M.exact_match(answer, item.references),
            }
        )
    out: dict[str, Any] = {"metric": metric, "n": len(rows)}
    out["exact_match"] = sum(r["exact_match"] for r in rows) / len(rows) if rows else 0.0
    if metric == "vqa":
        for row in rows:
            row["score"] = M.vqa_accuracy(row["answer"], row["references"])
            row["correct"] = row["score"] > 0
        out["vqa_accuracy"] = sum(r["score"] for r in rows) / len(rows) if rows else 0.0
        out["score"] = out["vqa_accuracy"]
    elif metric == "choice":
        for row in rows:
            row["score"] = row["exact_match"]
            row["correct"] = bool(row["exact_match"])
        out["accuracy"] = out["exact_match"]
        out["score"] = out["accuracy"]
    elif metric == "yesno":
        predicted = [M.yes_no(r["answer"]) for r in rows]
        labels = [M.yes_no(r["references"][0]) for r in rows]  # "Yes, there is." counts as yes
        for row, p, y in zip(rows, predicted, labels):
            row["predicted"] = p
            row["correct"] = p == y
            row["score"] = float(p == y)
        out.update(M.yes_no_metrics(predicted, labels))
        out["score"] = out["accuracy"]
    elif metric == "caption":
        corpus, per_item = M.caption_scores([r["answer"] for r in rows], [r["references"] for r in rows])
        for row, scores in zip(rows, per_item):
            row.update(scores)
            row["score"] = scores["cider"]
            row["correct"] = bool(row["exact_match"])
        out.update(corpus)
        out["score"] = corpus["cider"]
    else:  # exact
        for row in rows:
            row["score"] = row["exact_match"]
            row["correct"] = bool(row["exact_match"])
        out["score"] = out["exact_match"]
    by_type: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row["question_type"] is not None:
            by_type[row["question_type"]].append(row["score"])
    out["by_type"] = {k: sum(v) / len(v) for k, v in sorted(by_type.items())}
    out["by_type_n"] = {k: len(v) for k, v in sorted(by_type.items())}
    embedded = {str(image): image for item in items for image in item.images if isinstance(image, RowImage)}
    return EvalResult(metrics=out, rows=rows, embedded=embedded)


def evaluate_run(
    chat,
    data: Path | str,
    images: Path | str,
    *,
    metric: str = "auto",
    batch_size: int = 8,
    limit: int = 0,
    max_new_tokens: int = 32,
    prompt_suffix: str = "",
    progress: bool = True,
) -> EvalResult:
    """Answer every item of ``data`` with ``chat`` (a :class:`chat.assistant.VisionChat`) and score it.

    ``metrics`` always holds ``metric``, ``n``, ``exact_match``, ``score`` (the chosen
    metric's headline number) and ``by_type`` (mean per-item score per ``question_type``:
    accuracy for vqa/exact/yesno, CIDEr for captions), plus the metric's own numbers.
    ``prompt_suffix`` is appended to each question (e.g. LLaVA's "Answer the question
    using a single word or phrase."). ``metric="choice"`` (``auto`` when every item has ``choices``)
    scores candidates instead of generating; items without ``choices`` are then skipped and reported.
    """
    if metric not in M.METRICS:
        raise ValueError(f"metric '{metric}' is not one of {', '.join(M.METRICS)}")
    items, report = load_eval_set(data, images, limit)
    if not items:
        raise ValueError(f"no usable eval items in {data}:\n{report.summary()}")
    if metric == "auto" and all(it.choices for it in items):
        metric = "choice"
    started = time.perf_counter()
    if metric == "choice":
        for item in [it for it in items if not it.choices]:
            report.skip(str(data), item.id, "no 'choices' field: the choice metric needs candidate answers")
        items = [it for it in items if it.choices]
        if not items:
            raise ValueError(f"the choice metric needs items with 'choices'; {data} has none")
        answers = choose_answers(chat, items, batch_size=batch_size, prompt_suffix=prompt_suffix, report=report,
                                 progress=progress)
    else:
        answers = generate_answers(chat, items, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                   prompt_suffix=prompt_suffix, report=report, progress=progress)
    elapsed = time.perf_counter() - started
    answered = [(it, a) for it, a in zip(items, answers) if a is not None]
    result = score_answers([it for it, _ in answered], [a for _, a in answered], metric)
    run = getattr(getattr(getattr(chat, "config", None), "train", None), "output_dir", None)
    result.metrics.update(
        {
            "n_skipped": len(report.problems),
            "data": str(data),
            "images": str(images) if images else None,
            "run": str(run) if run else None,
            "max_new_tokens": max_new_tokens,
            "prompt_suffix": prompt_suffix,
            "generation_s": round(elapsed, 3),
        }
    )
    result.report = report
    return result
