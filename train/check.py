"""``phiclip data check``: validate a dataset without training."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from train.images import ImageError, ImageResolver, open_image
from train.records import Report, read_records


def check_dataset(data: str | Path, images: str | Path = "") -> Report:
    """Parse every record and fully decode every image it references; problems go in the report."""
    records, report = read_records(data)
    resolver = ImageResolver(images)
    kept = 0
    for record in tqdm(records, desc="checking images", unit="rec", mininterval=1):
        if record.image is not None:
            try:
                open_image(resolver.resolve(record.image))
            except ImageError as err:
                report.skip(str(data), record.id, str(err))
                continue
        kept += 1
    report.n_kept = kept
    return report
