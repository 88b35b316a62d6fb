"""LLaVA JSON + image files written out as a parquet dataset with the images inside.

One folder to move to a cluster instead of a JSON and a hundred thousand files:
``OUT/data/train-NNNNN-of-NNNNN.parquet`` in LLaVA's layout in columns (``id``; ``conversations`` with
``from`` / ``value`` and ``<image>`` markers; ``images``: a list of ``datasets.Image`` holding each file's
bytes as they are, not re-encoded). PhiClip reads it as ``data.train=OUT``, ``datasets.load_dataset(OUT)``
as its ``train`` split. Records are written as training reads them (:func:`data.sources.read_records`): a
record it would skip, or one whose image file is missing, is left out and reported. A record's images are
stored with it, so an image two records share is stored twice.
"""

from __future__ import annotations

import math
from pathlib import Path

from data.images import ImageResolver
from data.records import Record, Report
from data.sources import read_records
from processing_phiclip import ImageError

SPEAKERS = {"user": "human", "assistant": "gpt", "system": "system"}  # LLaVA's names for the roles
SHARD_RECORDS = 1000  # records per parquet file
ROW_GROUP_RECORDS = 100  # records per parquet row group (what a stream reads at a time)


def write_parquet(data: str | Path, images: str | Path, out: str | Path, shard_records: int = SHARD_RECORDS) -> Report:
    """Write ``data`` (LLaVA JSON/JSONL, image names relative to ``images``) to ``out/data/*.parquet``.

    Returns the report of records read, written (``n_kept``) and left out. Raises ``FileExistsError`` if
    ``out/data`` already holds parquet files, ``ValueError`` when no record can be written.
    """
    from datasets import Dataset, Features, Image, List, Value

    out = Path(out)
    folder = out / "data"
    if folder.is_dir() and any(folder.glob("*.parquet")):
        raise FileExistsError(f"{folder} already holds parquet files; write to another folder")
    records, report = read_records(data)
    resolver = ImageResolver(images)
    rows: list[tuple[Record, list[Path]]] = []
    for record in records:
        try:
            rows.append((record, [resolver.resolve(name) for name in record.images]))
        except ImageError as err:
            report.skip(str(data), record.id, str(err))
    report.n_kept = len(rows)
    if not rows:
        raise ValueError(f"no record of {data} can be written:\n{report.summary()}")
    features = Features({
        "id": Value("string"),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
        "images": List(Image()),
    })
    folder.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(rows) / shard_records)
    for shard in range(n_shards):
        part = rows[shard * shard_records:(shard + 1) * shard_records]
        columns = {
            "id": [record.id for record, _ in part],
            "conversations": [[{"from": SPEAKERS[t.role], "value": t.content} for t in record.turns]
                              for record, _ in part],
            "images": [[{"bytes": path.read_bytes(), "path": name} for name, path in zip(record.images, paths)]
                       for record, paths in part],
        }
        name = folder / f"train-{shard:05d}-of-{n_shards:05d}.parquet"
        Dataset.from_dict(columns, features=features).to_parquet(str(name), batch_size=ROW_GROUP_RECORDS)
    return report
