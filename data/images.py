"""Find a record's image safely: a file in the images folder, or an image embedded in a dataset
(opening and preparing it is :mod:`processing_phiclip`'s job).

COCO ships the same photo as ``000000033471.jpg`` (2017) and
``COCO_train2014_000000033471.jpg`` (2014); LLaVA-Instruct uses the 2017 name. Both are
tried with a few ``stat`` calls, never by listing the folder per sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processing_phiclip import ImageError

_COCO_ID = re.compile(r"(?:COCO_(?:train|val)2014_)?(\d{12})\.jpg$")


class StoredImages:
    """The image columns of a loaded ``datasets.Dataset``, read one row at a time from its memory-mapped Arrow
    files: records keep a :class:`RowImage` (a few numbers) instead of the image's bytes."""

    def __init__(self, rows: Any, name: str) -> None:
        self.rows = rows  # the dataset's image columns, formatted as Arrow (nothing is decoded)
        self.name = name

    def read(self, row: int, column: str, index: int | None) -> bytes:
        """The encoded bytes of one image; raises :class:`ImageError` when the entry holds none."""
        value = self.rows[row].column(column)[0].as_py()
        if index is not None:
            value = value[index]
        data = value.get("bytes") if isinstance(value, dict) else value
        if not isinstance(data, bytes) or not data:
            raise ImageError(f"unreadable image: {self.name} row {row} '{column}' holds no image bytes", "unreadable")
        return data


@dataclass(frozen=True)
class RowImage:
    """An image embedded in a row of a loaded dataset: column ``column`` of row ``row``, item ``index`` of it
    when the column holds a list."""

    images: StoredImages
    row: int
    column: str
    index: int | None = None

    def read(self) -> bytes:
        return self.images.read(self.row, self.column, self.index)

    def __str__(self) -> str:
        item = f"[{self.index}]" if self.index is not None else ""
        return f"{self.images.name} row {self.row} '{self.column}'{item}"


class ImageResolver:
    def __init__(self, images_dir: str | Path) -> None:
        self.root = Path(images_dir).resolve() if images_dir else None

    def source(self, image: Any) -> Any:
        """What :func:`processing_phiclip.open_image` reads for a ``Record.images`` entry: a file name's path
        (:meth:`resolve`), an embedded image's bytes, anything else as it is. Raises :class:`ImageError`."""
        if isinstance(image, str):
            return self.resolve(image)
        if isinstance(image, RowImage):
            return image.read()
        return image

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
