"""Request checks that need no model: images, data URLs, OpenAI request fields."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from processing_phiclip import prepare_image
from serve.errors import ServeError
from serve.inputs import Limits, decode_data_url, decode_image, join_question
from serve.schema import parse_chat, parse_json
from serve.speech import sniff_format

LIMITS = Limits(max_upload_bytes=1024 * 1024, max_pixels=1_000_000)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK", "I;16"])
def test_any_image_mode_becomes_rgb(mode):
    fmt = "TIFF" if mode in ("CMYK",) else "PNG"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 10, 3), dtype=np.uint8)).convert(mode)
    out = prepare_image(decode_image(encode(image, fmt), LIMITS), "crop")
    assert out.mode == "RGB" and out.size == (10, 12)


@pytest.mark.parametrize(
    "data,status,fragment",
    [
        (b"", 400, "empty"),
        (encode(Image.effect_noise((64, 64), 50))[:100], 400, "corrupt or truncated"),
        (b"just some text", 415, "not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not an image"),  # EPS would run Ghostscript
        (encode(Image.new("L", (1001, 1000))), 413, "too many pixels: 1001x1000"),
        (bytes(2 * 1024 * 1024), 413, "limit is 1.0 MB"),
    ],
)
def test_bad_images(data, status, fragment):
    with pytest.raises(ServeError) as err:
        decode_image(data, LIMITS)
    assert err.value.status == status and fragment in err.value.message


def test_truncated_image():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ServeError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_data_urls():
    raw = b"\x00\x01hello"
    assert decode_data_url("data:image/png;base64," + base64.b64encode(raw).decode(), LIMITS, "u") == ("image/png", raw)
    for url, fragment in [
        ("https://example.com/cat.png", "does not fetch remote URLs"),
        ("file:///etc/passwd", "does not fetch remote URLs"),
        ("/etc/passwd", "malformed data URL"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64,!!!!", "not valid base64"),
        ("data:image/png;base64," + "A" * 2_000_000, "limit"),
    ]:
        with pytest.raises(ServeError, match=fragment):
            decode_data_url(url, LIMITS, "u")


def test_question_joins_typed_text_and_transcript_and_keeps_text_as_written():
    assert join_question("  What is <image> this? ", "a red circle") == "What is <image> this?\na red circle"
    assert join_question("", "") == ""


def test_audio_sniffing():
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") == "wav"
    assert sniff_format(b"OggS\x00") == "ogg"
    assert sniff_format(b"\x1a\x45\xdf\xa3") == "matroska"
    assert sniff_format(b"ID3\x04") == "mp3"
    assert sniff_format(b"\x00\x00\x00\x20ftypM4A ") == "mp4"
    assert sniff_format(b"#EXTM3U\nfile:///etc/passwd") is None  # playlists are never opened


def test_parse_chat_fields():
    data = parse_json(
        b'{"model": "m", "messages": [{"role": "developer", "content": "Be brief."},'
        b' {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],'
        b' "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stream": true,'
        b' "refine": true, "postprocess": true, "drop_punctuation": true, "user": "ignored"}'
    )
    req = parse_chat(data, ["m"], LIMITS, None)
    assert req.stream and req.model == "m"
    assert req.job.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (req.job.settings.max_new_tokens, req.job.settings.temperature, req.job.settings.top_p) == (7, 0.5, 0.9)
    assert req.job.refine and req.job.post.clean and req.job.post.drop_punctuation
    with pytest.raises(ServeError, match="no speech recognition"):
        parse_chat(
            {
                "model": "m",
                "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA"}}]}],
            },
            ["m"],
            LIMITS,
            None,
        )
