"""Check what a request carries before the model sees it: image bytes, data URLs, text.

Uploads are handled as bytes in memory; nothing from a request is ever used as a path on
disk. Images are decoded with the same rules as training images
(:mod:`train.images`): a pixel limit that refuses decompression bombs before
decoding, full decoding so truncated files fail here and not inside the model, and
conversion of any mode to RGB. Only plain raster formats are opened (no EPS/PDF and other
formats that call out to external programs).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from train.images import MAX_PIXELS, to_rgb
from train.records import IMAGE_PLACEHOLDER
from serve.errors import bad_request, too_large, unsupported

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_audio_seconds: float = 600.0
    max_text_chars: int = 100_000

    @classmethod
    def from_mb(cls, max_upload_mb: float, **kwargs) -> "Limits":
        return cls(max_upload_bytes=int(max_upload_mb * 1024 * 1024), **kwargs)


def check_size(data: bytes, limits: Limits, what: str, param: str | None = None) -> None:
    if len(data) > limits.max_upload_bytes:
        raise too_large(
            f"{what} is {len(data) / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.1f} MB", param
        )


def decode_image(data: bytes, limits: Limits, param: str | None = "image") -> Image.Image:
    """An RGB image from uploaded bytes, or a :class:`ServeError` naming the problem."""
    if not data:
        raise bad_request("the image is empty (0 bytes)", param, "invalid_image")
    check_size(data, limits, "the image", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > limits.max_pixels:
                    raise too_large(
                        f"the image has too many pixels: {width}x{height}; the limit is {limits.max_pixels:,} pixels",
                        param,
                    )
                image.load()
                return to_rgb(image)
    except UnidentifiedImageError as err:
        raise unsupported(
            f"not an image, or an unsupported image format (supported: {', '.join(IMAGE_FORMATS)})", param
        ) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise too_large(
            f"the image has too many pixels (limit {limits.max_pixels:,}); it looks like a decompression bomb", param
        ) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise bad_request(f"the image is corrupt or truncated: {err}", param, "invalid_image") from err


def decode_data_url(url: str, limits: Limits, param: str) -> tuple[str, bytes]:
    """``(mime type, bytes)`` of a ``data:`` URL; remote URLs are refused (nothing is fetched)."""
    if not isinstance(url, str) or not url:
        raise bad_request("expected a data URL string", param)
    match = _DATA_URL.match(url[:512])
    if match is None:
        if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I):
            raise bad_request(
                "only data URLs (data:image/png;base64,...) are accepted; the server does not fetch remote URLs",
                param,
            )
        raise bad_request("malformed data URL; expected data:<mime type>;base64,<data>", param)
    payload = url[match.end() :]
    # base64 grows data by 4/3: refuse before decoding anything huge
    if len(payload) * 3 // 4 > limits.max_upload_bytes:
        raise too_large(
            f"the data URL holds about {len(payload) * 3 / 4 / 1e6:.1f} MB; the limit is "
            f"{limits.max_upload_bytes / 1e6:.1f} MB",
            param,
        )
    if not match.group("b64"):
        raise bad_request("the data URL must be base64-encoded (data:<mime type>;base64,...)", param)
    try:
        data = base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"the data URL is not valid base64: {err}", param) from err
    return (match.group("mime") or "").lower(), data


def decode_base64(text: str, limits: Limits, param: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise bad_request("expected base64-encoded data", param)
    if len(text) * 3 // 4 > limits.max_upload_bytes:
        raise too_large(
            f"the data is about {len(text) * 3 / 4 / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.1f} MB",
            param,
        )
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as err:
        raise bad_request(f"not valid base64: {err}", param) from err


def clean_text(text: str) -> str:
    """User text as the model should see it: no image placeholder (the server places its own)."""
    return text.replace(IMAGE_PLACEHOLDER, " ").replace("\x00", "").strip()


def join_question(typed: str | None, transcript: str | None) -> str:
    """The question of one turn: typed text, then the words of the recording."""
    return "\n".join(part for part in (clean_text(typed or ""), (transcript or "").strip()) if part)
