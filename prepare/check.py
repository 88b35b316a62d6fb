"""The final check: is every image the conversations refer to where training will look for it?"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data.images import ImageError, ImageResolver
from data.sources import read_records
from prepare.common import PrepareError

MAX_MISSING_SHOWN = 20


@dataclass
class PrepareSummary:
    json_path: Path
    images_dir: Path
    n_records: int
    n_images_referenced: int
    missing: list[str] = field(default_factory=list)
    n_unusable: int = 0  # records training skips (``phiclip data check`` says why)

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    def report(self) -> str:
        lines = [
            f"conversations: {self.json_path} ({self.n_records} records)",
            f"images:        {self.images_dir}",
            f"referenced images: {self.n_images_referenced}, "
            f"present: {self.n_images_referenced - self.n_missing}, missing: {self.n_missing}",
        ]
        if self.n_unusable:
            lines.append(f"records training will skip: {self.n_unusable} (phiclip data check {self.json_path} says why)")
        if self.missing:
            by_folder = Counter(m.split("/", 1)[0] if "/" in m else "." for m in self.missing)
            if len(by_folder) > 1 or "." not in by_folder:
                lines.append(
                    "missing by folder: "
                    + ", ".join(f"{k}: {v}" for k, v in by_folder.most_common())
                )
            lines.append(f"first {min(MAX_MISSING_SHOWN, self.n_missing)} missing:")
            lines += [f"  {m}" for m in self.missing[:MAX_MISSING_SHOWN]]
            if self.n_missing > MAX_MISSING_SHOWN:
                lines.append(f"  ... and {self.n_missing - MAX_MISSING_SHOWN} more")
        return "\n".join(lines)


def check_images(json_path: Path, images_dir: Path) -> PrepareSummary:
    """Records read, distinct images referenced, the missing ones (sorted), and records training skips.

    Read as training reads it: :func:`data.sources.read_records` parses the records (one that
    training would skip is counted, and its image not looked for), and an image counts as present
    when :class:`data.images.ImageResolver` finds it, COCO 2014/2017 name aliases included.
    """
    try:
        records, report = read_records(json_path)
    except OSError as e:
        raise PrepareError(f"cannot read {json_path}: {e}") from None
    except ValueError as e:
        raise PrepareError(f"{e}; delete it and rerun") from None
    referenced = {name for record in records for name in record.images}
    resolver = ImageResolver(images_dir)
    missing = sorted(ref for ref in referenced if not _resolves(resolver, ref))
    return PrepareSummary(json_path, images_dir, report.n_read, len(referenced), missing, len(report.problems))


def _resolves(resolver: ImageResolver, ref: str) -> bool:
    try:
        resolver.resolve(ref)
    except ImageError:
        return False
    return True
