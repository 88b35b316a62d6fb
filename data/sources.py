"""Where records come from: one dispatcher that picks the reader for a data source (no reader imports another).

A source is LLaVA JSON/JSONL (:mod:`data.records`) or a Hugging Face dataset (``hf://...``, parquet/arrow
files, a folder: :mod:`data.hf_records`); both give the same :class:`~data.records.Record` s and
:class:`~data.records.Report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from data.hf_records import iter_dataset_rows, local_folder
from data.records import BadRecord, Record, Report, iter_raw, parse_record, raw_id

T = TypeVar("T")
Fetch = Callable[[], tuple[Any, list[Any] | None]]  # a record's raw LLaVA dict and its images (None: by name)


def is_dataset_source(source: str | Path) -> bool:
    """Whether ``source`` names a Hugging Face dataset (``hf://...``, parquet/arrow files, a folder), not LLaVA JSON."""
    text = str(source)
    return (text.startswith("hf://") or Path(text).is_dir()
            or text.endswith((".parquet", ".arrow")))


def images_dir(source: str | Path, images: str | Path = "") -> str:
    """The folder a source's image file names are relative to: ``images`` if given, else a local dataset's own
    folder (LLaVA JSON keeps asking for ``images``)."""
    if images or not is_dataset_source(source):
        return str(images)
    folder = local_folder(str(source))
    return str(folder) if folder is not None else ""


def read_source(source: str | Path, parse: Callable[[Any, str, int, list[Any] | None], T], limit: int = 0,
                what: str = "data file") -> tuple[list[T], Report]:
    """Every record of a source, each turned into a ``T`` by ``parse(raw, source, index, images)``: the one loop
    that reads records, for training and evaluation alike.

    A record that ``parse`` (or the dataset row) refuses with :class:`~data.records.BadRecord` is skipped and
    listed in the report (source, record id, reason); nothing stops the read. ``limit``: stop after that many
    usable records (0: all). Raises ``FileNotFoundError`` naming ``what`` for a JSON path that is not a file.
    """
    report = Report()
    out: list[T] = []
    for name, index, rid, fetch in _entries(source, report, what):
        if limit and len(out) >= limit:
            break
        report.n_read += 1
        try:
            raw, images = fetch()
            out.append(parse(raw, name, index, images))
        except BadRecord as err:
            report.skip(name, rid, str(err))
            continue
        report.n_kept += 1
    return out, report


def _entries(source: str | Path, report: Report, what: str) -> Iterator[tuple[str, int, str, Fetch]]:
    """(source name, index, record id, fetch) for each record: a dataset's rows, or a JSON file's entries."""
    if is_dataset_source(source):
        for row in iter_dataset_rows(str(source)):
            yield str(source), row.index, row.id, row.to_llava
        return
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    for index, raw in iter_raw(path, report):
        yield str(path), index, raw_id(raw, index), lambda raw=raw: (raw, None)


def read_records(path: str | Path, limit: int = 0) -> tuple[list[Record], Report]:
    """Read a LLaVA JSON/JSONL file or a dataset (:func:`is_dataset_source`) into records (:func:`read_source`)."""
    return read_source(path, parse_record, limit)
