"""Find and open a record's image safely.

COCO ships the same photo as ``000000033471.jpg`` (2017) and
``COCO_train2014_000000033471.jpg`` (2014); LLaVA-Instruct uses the 2017 name. Both are
tried with a few ``stat`` calls, never by listing the folder per sample.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Refuse absurd pixel counts (decompression bombs) instead of only warning.
MAX_PIXELS = 64_000_000
_COCO_ID = re.compile(r"(?:COCO_(?:train|val)2014_)?(\d{12})\.jpg$")


class ImageError(ValueError):
    """An image that cannot be used; the message says why."""


class ImageResolver:
    def __init__(self, images_dir: str | Path) -> None:
        self.root = Path(images_dir).resolve() if images_dir else None

    def resolve(self, name: str) -> Path:
        """The file for ``name``, inside the images folder; raises :class:`ImageError` otherwise."""
        if self.root is None:
            raise ImageError("record has an image but no images folder was given")
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise ImageError(f"image path escapes the images folder: {name!r}")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise ImageError(f"image path escapes the images folder: {name!r}")
        if path.is_file():
            return path
        for alt in self._coco_aliases(rel):
            candidate = (self.root / alt).resolve()
            if candidate.is_relative_to(self.root) and candidate.is_file():
                return candidate
        raise ImageError(f"missing image: {name} (looked in {self.root})")

    @staticmethod
    def _coco_aliases(rel: Path) -> list[Path]:
        match = _COCO_ID.search(rel.name)
        if not match:
            return []
        cid = match.group(1)
        names = [f"{cid}.jpg", f"COCO_train2014_{cid}.jpg", f"COCO_val2014_{cid}.jpg"]
        parents = [rel.parent, rel.parent / "train2017", rel.parent / "train2014", rel.parent / "val2014"]
        return [parent / n for parent in parents for n in names if (parent / n) != rel]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: transparency onto white, 16-bit scaled, CMYK/palette/gray converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / top * 255.0, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(array.max() - array.min(), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def open_image(path: str | Path) -> Image.Image:
    """Fully decode an image file as RGB, or raise :class:`ImageError` naming the problem."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise ImageError(f"image too large: {width}x{height} pixels (limit {MAX_PIXELS})")
                image.load()
                return to_rgb(image)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image too large: {err}") from err
    except FileNotFoundError as err:
        raise ImageError(f"missing image: {path}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"unreadable image: {Path(path).name}: {err}") from err
