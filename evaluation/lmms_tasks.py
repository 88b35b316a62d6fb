"""An eval set as an lmms-eval task: a folder of YAML and JSON lines that ``lmms-eval --include_path`` reads.

:func:`write_task` reads the eval set as ``phiclip eval`` does (:func:`evaluation.evaluate.load_eval_set`) and
writes ``NAME.jsonl`` (one document per item) and ``NAME.yaml`` (the task). The task's functions live here and
score with ``phiclip eval``'s own metrics, so lmms-eval and ``phiclip eval`` give the same number for the same
answers:

- ``exact`` / ``vqa``: ``generate_until``, scored by :func:`evaluation.metrics.exact_match` / ``vqa_accuracy``;
- ``yesno``: ``generate_until``, POPE's accuracy, F1 (yes is positive) and yes-ratio;
- ``choice``: lmms-eval's ``multiple_choice`` (each candidate's log-likelihood, ``acc``).

A document keeps the question as the record writes it, ``<image>`` markers included (or left out, for models
other than PhiClip), and its images as absolute paths (or data URLs for images embedded in a dataset), opened by
:func:`processing_phiclip.open_image`.
Sources: lmms-eval's task YAML (github.com/EvolvingLMMs-Lab/lmms-eval, ``lmms_eval/tasks``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data.images import RowImage
from data.records import Report
from evaluation import metrics as M
from evaluation.evaluate import EvalItem, load_eval_set
from processing_phiclip import IMAGE_TOKEN, open_image

TASK_METRICS = ("exact", "vqa", "yesno", "choice")
_FN = "!function evaluation.lmms_tasks."


def _image_field(image: Path | RowImage) -> str:
    if isinstance(image, RowImage):
        return "data:image/png;base64," + base64.b64encode(image.read()).decode()
    return str(Path(image).resolve())


def _document(item: EvalItem, prompt_suffix: str, image_markers: bool) -> dict[str, Any]:
    question = item.messages[-1]["content"]
    if not image_markers:
        question = " ".join(part.strip() for part in question.split(IMAGE_TOKEN) if part.strip())
    return {
        "id": item.id,
        "question": f"{question}\n{prompt_suffix}" if prompt_suffix else question,
        "references": item.references,
        "images": [_image_field(image) for image in item.images],
        "question_type": item.question_type or "",
        "choices": item.choices or [],
    }


def _yaml(name: str, metric: str, max_new_tokens: int) -> str:
    common = [
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {name}.jsonl}}",
        "test_split: test",
        f"doc_to_visual: {_FN}doc_to_visual",
        f"doc_to_text: {_FN}doc_to_text",
    ]
    if metric == "choice":
        body = [
            "output_type: multiple_choice",
            f"doc_to_choice: {_FN}doc_to_choice",
            f"doc_to_target: {_FN}doc_to_choice_index",
            'target_delimiter: ""',
            "metric_list:",
            "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        ]
    else:
        metrics = {"exact": ["exact_match"], "vqa": ["vqa_accuracy"], "yesno": ["accuracy", "f1", "yes_ratio"]}[metric]
        body = [
            "output_type: generate_until",
            f"doc_to_target: {_FN}doc_to_target",
            "generation_kwargs:",
            f"  max_new_tokens: {max_new_tokens}",
            "  temperature: 0",
            "  do_sample: false",
            f"process_results: {_FN}process_{metric}",
            "metric_list:",
        ]
        for key in metrics:
            aggregation = f"{_FN}aggregate_{key}" if metric == "yesno" else "mean"
            body.append(f"  - {{metric: {key}, aggregation: {aggregation}, higher_is_better: "
                        f"{'false' if key == 'yes_ratio' else 'true'}}}")
    return "\n".join([*common, *body, "metadata:", "  version: 1.0", ""])


def write_task(
    data: str | Path,
    out_dir: str | Path,
    name: str,
    *,
    images: str | Path | None = None,
    metric: str = "auto",
    max_new_tokens: int = 32,
    prompt_suffix: str = "",
    limit: int = 0,
    image_markers: bool = True,
) -> tuple[Path, Report]:
    """Write the lmms-eval task ``name`` for the eval set ``data`` (as ``phiclip eval`` reads it) into ``out_dir``.

    ``metric``: one of :data:`TASK_METRICS`, or ``auto`` (``choice`` when every item has ``choices``, else
    as ``phiclip eval`` picks). Items with earlier turns are skipped and reported (lmms-eval hands a model one
    question). ``image_markers=False`` writes questions without ``<image>``, as benchmarks ask them (a model
    then puts the images first): the form every lmms-eval model reads, where ``llava_hf`` and the OpenAI backend
    would take a marker for text. Returns the YAML's path and the reading report. Raises ``ValueError`` for a
    metric lmms-eval cannot score this way (``caption``), a name that is not an identifier, or a set with no usable item.
    """
    if not name.replace("_", "").isalnum():
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    items, report = load_eval_set(data, images, limit)
    for item in [it for it in items if len(it.messages) > 1]:
        report.skip(str(data), item.id,
                    f"{len(item.messages) - 1} earlier turn(s): an lmms-eval task asks one question")
    items = [it for it in items if len(it.messages) == 1]
    if not items:
        raise ValueError(f"no usable eval items in {data}:\n{report.summary()}")
    if metric == "auto":
        metric = "choice" if all(it.choices for it in items) else M.choose_metric([it.references for it in items])
    if metric not in TASK_METRICS:
        raise ValueError(f"metric '{metric}' has no lmms-eval task here (one of {', '.join(TASK_METRICS)}); "
                         "score it with phiclip eval")
    if metric == "choice":
        for item in [it for it in items if not it.choices]:
            report.skip(str(data), item.id, "no 'choices' field: the choice metric needs candidate answers")
        items = [it for it in items if it.choices]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(_document(item, prompt_suffix, image_markers)) + "\n")
    path = out / f"{name}.yaml"
    path.write_text(_yaml(name, metric, max_new_tokens), encoding="utf-8")
    return path, report


def write_group(out_dir: str | Path, group: str, tasks: Sequence[str]) -> Path:
    """A group YAML in ``out_dir`` that runs ``tasks`` together (``--tasks GROUP``)."""
    path = Path(out_dir) / f"{group}.yaml"
    path.write_text("\n".join([f"group: {group}", "task:", *[f"  - {t}" for t in tasks], ""]), encoding="utf-8")
    return path


# ---- the task's functions (called by lmms-eval with one document) ----------------------------------

def doc_to_visual(doc: dict) -> list:
    """The document's images, opened (RGB PIL images); raises :class:`processing_phiclip.ImageError`."""
    return [open_image(source) for source in doc["images"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["references"][0]


def doc_to_choice(doc: dict) -> list[str]:
    return doc["choices"]


def doc_to_choice_index(doc: dict) -> int:
    return next(i for i, choice in enumerate(doc["choices"]) if choice in doc["references"])


def process_exact(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": M.exact_match(results[0], doc["references"])}


def process_vqa(doc: dict, results: list[str]) -> dict[str, float]:
    return {"vqa_accuracy": M.vqa_accuracy(results[0], doc["references"])}


def process_yesno(doc: dict, results: list[str]) -> dict[str, tuple[str | None, str | None]]:
    pair = (M.yes_no(results[0]), M.yes_no(doc["references"][0]))
    return {"accuracy": pair, "f1": pair, "yes_ratio": pair}


def _yes_no(pairs: list[tuple[str | None, str | None]], key: str) -> float:
    return M.yes_no_metrics([p for p, _ in pairs], [y for _, y in pairs])[key]


def aggregate_accuracy(pairs: list) -> float:
    return _yes_no(pairs, "accuracy")


def aggregate_f1(pairs: list) -> float:
    return _yes_no(pairs, "f1")


def aggregate_yes_ratio(pairs: list) -> float:
    return _yes_no(pairs, "yes_ratio")
