"""Find a record's image file safely (opening and preparing it is :mod:`processing_phiclip`'s job).

COCO ships the same photo as ``000000033471.jpg`` (2017) and
``COCO_train2014_000000033471.jpg`` (2014); LLaVA-Instruct uses the 2017 name. Both are
tried with a few ``stat`` calls, never by listing the folder per sample.
"""

from __future__ import annotations

import re
from pathlib import Path

from processing_phiclip import ImageError

_COCO_ID = re.compile(r"(?:COCO_(?:train|val)2014_)?(\d{12})\.jpg$")


class ImageResolver:
    def __init__(self, images_dir: str | Path) -> None:
        self.root = Path(images_dir).resolve() if images_dir else None

    def resolve(self, name: str) -> Path:
        """The file for ``name``, inside the images folder; raises :class:`ImageError` otherwise."""
        if self.root is None:
            raise ImageError("record has an image but no images folder was given", "missing")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ImageError(f"image path escapes the images folder: {name!r}", "missing")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise ImageError(f"image path escapes the images folder: {name!r}", "missing")
        if path.is_file():
            return path
        for alt in self._coco_aliases(rel):
            candidate = (self.root / alt).resolve()
            if candidate.is_relative_to(self.root) and candidate.is_file():
                return candidate
        raise ImageError(f"missing image: {name} (looked in {self.root})", "missing")

    @staticmethod
    def _coco_aliases(rel: Path) -> list[Path]:
        match = _COCO_ID.search(rel.name)
        if not match:
            return []
        cid = match.group(1)
        names = [f"{cid}.jpg", f"COCO_train2014_{cid}.jpg", f"COCO_val2014_{cid}.jpg"]
        parents = [rel.parent, rel.parent / "train2017", rel.parent / "train2014", rel.parent / "val2014"]
        return [parent / n for parent in parents for n in names if (parent / n) != rel]
