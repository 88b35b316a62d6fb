"""Evaluation results for the model card: lmms-eval's ``*_results.json`` and ``phiclip eval``'s ``metrics.json``.

Both become :class:`Score` records, one number each (a task's metric). Which format a file holds is told by its
keys: lmms-eval's has ``results`` and ``versions``, phiclip eval's ``metric`` and ``n``. A file that is missing, not
JSON, or not one of the two is refused with a ``ValueError`` naming it; nothing is skipped silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.hf_records import parse_source

LMMS_EVAL = "lmms-eval"
PHICLIP_EVAL = "phiclip eval"
# phiclip eval's numbers per metric (evaluation.evaluate.score_answers), the headline one first.
PHICLIP_METRICS = {
    "exact": ("exact_match",),
    "vqa": ("vqa_accuracy", "exact_match"),
    "choice": ("accuracy",),
    "yesno": ("accuracy", "f1", "yes_ratio"),
    "caption": ("cider", "bleu4", "rouge_l"),
}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


@dataclass(frozen=True)
class Score:
    """One number of one evaluation.

    ``task``: the harness's task name (lmms-eval's, or the eval set's name as ``phiclip eval`` names its
    ``eval/NAME`` folder). ``metric``: its metric, e.g. ``exact_match``, ``acc``, ``f1``; lmms-eval's filters other
    than ``none`` are kept as ``metric,filter``. ``value``: the metric as the harness wrote it (a fraction for
    accuracies, CIDEr etc. on their own scale). ``n``: items scored (``None`` where the file does not say, e.g. an
    lmms-eval group). ``dataset``: the Hub dataset id where the data is one, else the task name; ``dataset_config``,
    ``dataset_split`` and ``dataset_revision`` only for a Hub dataset. ``harness_version`` / ``task_version``:
    ``None`` where the file does not record one (phiclip eval records neither). ``source``: the file read.
    """

    task: str
    metric: str
    value: float
    harness: str
    harness_version: str | None
    task_version: str | None
    n: int | None
    dataset: str
    source: Path
    dataset_config: str | None = None
    dataset_split: str | None = None
    dataset_revision: str | None = None


def _number(value: Any, path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{path}: {where} is {value!r}, not a number")
    return float(value)


def _count(value: Any, path: Path, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{path}: {where} is {value!r}, not a count of items")
    return value


def _lmms_dataset(task: str, config: Any) -> dict[str, Any]:
    """The Hub dataset a task's config loads (``dataset_path`` an id, no local files), else the task name."""
    config = config if isinstance(config, dict) else {}
    path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") if isinstance(config.get("dataset_kwargs"), dict) else {}
    local = kwargs.get("load_from_disk") or "data_files" in kwargs or "data_dir" in kwargs
    if not isinstance(path, str) or not _HUB_ID.fullmatch(path) or local:
        return {"dataset": task}
    return {"dataset": path, "dataset_config": config.get("dataset_name"), "dataset_split": config.get("test_split"),
            "dataset_revision": kwargs.get("revision")}


def read_lmms_eval(path: Path, raw: dict[str, Any]) -> list[Score]:
    """The metrics of every task in lmms-eval's results (``raw``, read from ``path``), stderr left out.

    ``raw["results"]`` maps a task to ``{"<metric>,<filter>": value, "<metric>_stderr,<filter>": ..., "alias": ...}``;
    a group without metrics of its own gives nothing. Raises ``ValueError`` naming ``path`` for a malformed entry,
    a metric that is not a number, or a file without any metric.
    """
    results, versions = raw.get("results"), raw.get("versions")
    if not isinstance(results, dict) or not isinstance(versions, dict):
        raise ValueError(f"{path}: lmms-eval results need 'results' and 'versions' objects")
    n_samples = raw.get("n-samples") if isinstance(raw.get("n-samples"), dict) else {}
    configs = raw.get("configs") if isinstance(raw.get("configs"), dict) else {}
    # lmms-eval 0.7 writes here the git branch@commit of the folder it ran in (utils.get_lmms_eval_version_string),
    # which is the user's own repository, not lmms-eval's release: such a value is not claimed as the version.
    version = raw.get("lmms_eval_version")
    if isinstance(version, str) and "@" in version:
        version = None
    scores = []
    for task, entry in results.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: results[{task!r}] is {type(entry).__name__}, not an object")
        counts = n_samples.get(task)
        n = _count(counts.get("effective") if isinstance(counts, dict) else None, path, f"n-samples[{task!r}]")
        task_version = versions.get(task)
        for key, value in entry.items():
            metric, comma, kept = key.partition(",")
            if not comma or "_stderr" in metric:
                continue
            scores.append(Score(
                task=task, metric=metric if kept == "none" else key,
                value=_number(value, path, f"results[{task!r}][{key!r}]"),
                harness=LMMS_EVAL, harness_version=str(version) if version is not None else None,
                task_version=str(task_version) if task_version is not None else None, n=n, source=path,
                **_lmms_dataset(task, configs.get(task)),
            ))
    if not scores:
        raise ValueError(f"{path}: lmms-eval results without any metric")
    return scores


def read_phiclip_eval(path: Path, raw: dict[str, Any]) -> list[Score]:
    """The numbers of one ``phiclip eval`` (``raw``, its ``metrics.json`` read from ``path``).

    ``raw`` holds ``metric`` (a key of :data:`PHICLIP_METRICS`, whose numbers are read), ``n`` and ``data`` (the
    eval set: a file, or ``hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]``); other keys (``by_type``, a demo's
    ``two_image``) are left out. Raises ``ValueError`` naming ``path`` for an unknown metric or a missing number.
    """
    metric = raw.get("metric")
    if metric not in PHICLIP_METRICS:
        raise ValueError(f"{path}: phiclip eval metric {metric!r} is not one of {', '.join(PHICLIP_METRICS)}")
    data = raw.get("data")
    if not isinstance(data, str) or not data:
        raise ValueError(f"{path}: phiclip eval results need 'data', the eval set they score")
    source = parse_source(data)
    if source.repo is not None:
        task = re.sub(r"[^\w.-]+", "--", data.removeprefix("hf://"))  # as phiclip eval names its eval/ folder
        dataset = {"dataset": source.repo, "dataset_config": source.config, "dataset_split": source.split,
                   "dataset_revision": source.revision}
    else:
        task = Path(data).stem
        dataset = {"dataset": task}
    n = _count(raw.get("n"), path, "'n'")
    return [Score(task=task, metric=name, value=_number(raw.get(name), path, repr(name)), harness=PHICLIP_EVAL,
                  harness_version=None, task_version=None, n=n, source=path, **dataset)
            for name in PHICLIP_METRICS[metric]]


def read_results(path: str | Path) -> list[Score]:
    """The scores in one results file, either format (module docstring); ``ValueError`` naming it otherwise."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"{path}: cannot read results ({err.strerror or err})") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: results are not JSON ({err})") from err
    if isinstance(raw, dict) and "results" in raw and "versions" in raw:
        return read_lmms_eval(path, raw)
    if isinstance(raw, dict) and "metric" in raw and "n" in raw:
        return read_phiclip_eval(path, raw)
    raise ValueError(f"{path}: neither lmms-eval's results ('results' and 'versions' keys) nor phiclip eval's "
                     "metrics.json ('metric' and 'n' keys)")


def read_all(paths: Iterable[str | Path]) -> list[Score]:
    """The scores of every file, in order (a file named twice is read once).

    Raises ``ValueError`` for an unreadable file (:func:`read_results`) and for a task's metric that two files
    report for the same harness: the card would show two numbers for one thing.
    """
    files: dict[Path, Path] = {}
    for path in paths:
        files.setdefault(Path(path).resolve(), Path(path))
    scores: list[Score] = []
    seen: dict[tuple[str, str, str], Path] = {}
    for path in files.values():
        for score in read_results(path):
            key = (score.harness, score.task, score.metric)
            if key in seen:
                raise ValueError(f"{score.harness} {score.task} {score.metric} is in both {seen[key]} and {path}; "
                                 "give one of them")
            seen[key] = path
            scores.append(score)
    return scores
