"""Check what a request carries before the model sees it: image bytes, data URLs, text.

Uploads are handled as bytes in memory; nothing from a request is ever used as a path on
disk. Images are decoded by the processor's own :func:`processing_phiclip.open_image` (the one
road every image takes: a pixel limit that refuses decompression bombs before decoding, full
decoding so truncated files fail here and not inside the model, plain raster formats only);
this module only turns its errors into HTTP errors. Message text is kept as it is: the
processor tokenizes what a user writes as text, whatever it spells.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from processing_phiclip import MAX_PIXELS, ImageError, open_image
from processing_phiclip import decode_base64 as _decode_base64
from serve.errors import bad_request, too_large, unsupported

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass(frozen=True)
class Limits:
    """What one request may carry."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_PIXELS
    max_audio_seconds: float = 600.0
    max_text_chars: int = 100_000
    max_images: int = 8  # per conversation

    @classmethod
    def from_mb(cls, max_upload_mb: float, **kwargs) -> "Limits":
        return cls(max_upload_bytes=int(max_upload_mb * 1024 * 1024), **kwargs)


def check_size(data: bytes, limits: Limits, what: str, param: str | None = None) -> None:
    if len(data) > limits.max_upload_bytes:
        raise too_large(
            f"{what} is {len(data) / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.1f} MB", param
        )


def decode_image(data: bytes, limits: Limits, param: str | None = "image") -> Image.Image:
    """A fully decoded image from uploaded bytes (its mode kept: the processor prepares it), or a
    :class:`~serve.errors.ServeError` naming the problem."""
    if not data:
        raise bad_request("the image is empty (0 bytes)", param, "invalid_image")
    check_size(data, limits, "the image", param)
    try:
        return open_image(data, max_pixels=limits.max_pixels)
    except ImageError as err:
        if err.reason == "too_large":
            raise too_large(f"{err}; it looks like a decompression bomb or an oversized image", param) from err
        if err.reason == "unsupported":
            raise unsupported(str(err), param) from err
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
    return (match.group("mime") or "").lower(), _base64(payload, param, "the data URL")


def decode_base64(text: str, limits: Limits, param: str) -> bytes:
    if not isinstance(text, str) or not text:
        raise bad_request("expected base64-encoded data", param)
    if len(text) * 3 // 4 > limits.max_upload_bytes:
        raise too_large(
            f"the data is about {len(text) * 3 / 4 / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.1f} MB",
            param,
        )
    return _base64(text, param, "the data")


def _base64(text: str, param: str, what: str) -> bytes:
    """Base64 as clients send it (padding optional, line breaks, URL-safe alphabet), or a 400."""
    try:
        return _decode_base64(text)
    except ValueError as err:
        raise bad_request(f"{what} is {err}", param) from err


def clean_text(text: str) -> str:
    """User text as the model should see it: NUL characters removed, outer whitespace trimmed (nothing else:
    text that spells a special token or ``<image>`` is tokenized as text)."""
    return text.replace("\x00", "").strip()


def join_question(typed: str | None, transcript: str | None) -> str:
    """The question of one turn: typed text, then the words of the recording."""
    return "\n".join(part for part in (clean_text(typed or ""), (transcript or "").strip()) if part)
