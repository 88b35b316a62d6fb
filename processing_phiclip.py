"""Processor for PhiClip: the one place where images are prepared and conversations are tokenized.

Layout, top to bottom:

1. Images: ``open_image`` decodes whatever a user sends (path, bytes, base64, data URL, http(s) URL,
   PIL image, array) safely; ``prepare_image`` turns any PIL image into the RGB picture the tower
   sees (EXIF orientation, every PIL mode, transparency onto a background, and the aspect policy:
   ``pad`` to a square with the image processor's mean colour, LLaVA-1.5's choice, or ``crop``,
   CLIP's resize-then-centre-crop). Training, evaluation, chat, the server, the pipeline and the
   exports all call these two, so a picture reaches the model the same way on every road.
2. The chat template: the LM's own, preceded by a preamble that turns content parts into
   ``<image>\\n`` markers (images first, then the text), and ``encode_chat``, which tokenizes a
   conversation with labels. Text written by a user or a dataset is always tokenized as text:
   only the template's own special tokens and image positions get special ids.
3. ``PhiClipProcessor``: ``processor(images=..., text=...)`` and ``apply_chat_template``.

Each image is one ``<image>`` token in ``input_ids``; the model splices the image's features in
its place, so the processor need not know how many features an image has.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

try:  # fetching http(s) images; httpx comes with huggingface_hub
    import httpx
except ImportError:
    httpx = None

# ---- 1. images ---------------------------------------------------------------------------------

MAX_PIXELS = 64_000_000  # decompression bombs are refused before decoding
MAX_DOWNLOAD_BYTES = 50 * 1024 * 1024
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # plain rasters (JPEG includes MPO); nothing that runs other programs
ASPECTS = ("pad", "crop")


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is ``missing``, ``too_large``, ``unsupported`` or ``unreadable``."""

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


def decode_base64(text: str) -> bytes:
    """Bytes of base64 text as clients send it: ``=`` padding optional, line breaks and the URL-safe alphabet accepted.

    Raises ``ValueError`` naming the problem for anything else.
    """
    compact = re.sub(r"\s+", "", text)
    if not compact or not re.fullmatch(r"[A-Za-z0-9+/_-]*={0,2}", compact):
        raise ValueError("not valid base64: characters outside the base64 alphabet")
    compact = compact.rstrip("=").replace("-", "+").replace("_", "/")
    if len(compact) % 4 == 1:
        raise ValueError("not valid base64: truncated (length is one more than a multiple of 4)")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"not valid base64: {err}") from err


def _fetch(url: str) -> bytes:
    if httpx is None:
        raise ImageError(f"{url}: fetching images needs httpx (pip install httpx)", "unsupported")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=20) as response:
            response.raise_for_status()
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ImageError(f"{url}: larger than {MAX_DOWNLOAD_BYTES // 2**20} MB", "too_large")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as err:
        raise ImageError(f"{url}: could not download the image: {err}", "missing") from err


def _source_bytes(source: str | Path | bytes | dict) -> tuple[bytes | Path, str]:
    """``(bytes or file path, name for messages)`` of an image source that is not a decoded image."""
    if isinstance(source, dict):  # a `datasets` Image feature: {"bytes": ..., "path": ...}
        if source.get("bytes"):
            return bytes(source["bytes"]), str(source.get("path") or "embedded image")
        if source.get("path"):
            return Path(source["path"]), str(source["path"])
        raise ImageError("image record holds neither bytes nor a path", "missing")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), "image bytes"
    if isinstance(source, Path):
        return source, str(source)
    text = source.strip()
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header.lower():
            raise ImageError("data URL is not base64-encoded (data:<mime type>;base64,...)", "unreadable")
        try:
            return decode_base64(payload), "data URL"
        except ValueError as err:
            raise ImageError(f"data URL: {err}", "unreadable") from err
    if re.match(r"^https?://", text, re.I):
        return _fetch(text), text
    if len(text) < 1024 and Path(text).exists():
        return Path(text), text
    if len(text) >= 64:  # long and not a file: base64 without the data: prefix
        try:
            return decode_base64(text), "base64 image"
        except ValueError:
            pass
    raise ImageError(f"missing image: {text[:200]!r} is not a file, an http(s) URL, a data URL or base64", "missing")


def open_image(source: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully (first frame of an animation), refusing decompression bombs before decoding.

    ``source``: a path, bytes, base64 text, a ``data:`` URL, an http(s) URL, a ``datasets`` image dict
    (``{"bytes", "path"}``), a PIL image, or a ``(H, W[, C])`` / ``(C, H, W)`` array or tensor. The result
    keeps its mode and EXIF data: :func:`prepare_image` makes it RGB. Raises :class:`ImageError`.
    """
    if isinstance(source, Image.Image):
        image = source
        try:  # an image from Image.open is decoded lazily: a truncated file fails here, not in the model
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ImageError(f"unreadable image: {getattr(image, 'filename', '') or 'image'}: {err}") from err
    elif hasattr(source, "shape"):
        from transformers.image_transforms import to_pil_image

        image = to_pil_image(source.numpy() if hasattr(source, "numpy") else np.asarray(source))
    else:
        data, name = _source_bytes(source)
        image = _decode(io.BytesIO(data) if isinstance(data, bytes) else data, name, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: too many pixels: {width}x{height} (limit {max_pixels:,})", "too_large")
    if width < 1 or height < 1:
        raise ImageError(f"image is empty: {width}x{height} pixels", "unreadable")
    return image


def _decode(file: io.BytesIO | Path, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file, formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(f"image too large: {name}: too many pixels: {width}x{height} "
                                     f"(limit {max_pixels:,})", "too_large")
                image.load()
                exif = image.getexif()
                frame = image.copy()  # the first frame, detached from the file
                if exif:
                    frame.info["exif"] = exif.tobytes()
                return frame
    except ImageError:
        raise
    except FileNotFoundError as err:
        raise ImageError(f"missing image: {name}", "missing") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"unreadable image: {name}: not an image, or a format other than {', '.join(IMAGE_FORMATS)}",
                         "unsupported") from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(f"image too large: {name}: {err}", "too_large") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"unreadable image: {name}: {err}", "unreadable") from err


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode as RGB: transparency composited onto ``background``, 16/32-bit and float images scaled to 0-255."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        span = max(float(array.max() - array.min()), 1e-12)
        image = Image.fromarray(((array - array.min()) / span * 255).astype(np.uint8), mode="L")
    if image.mode in ("P", "PA") or (image.mode in ("L", "RGB", "1") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, tuple(background))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageError(f"image mode {image.mode} cannot be converted to RGB: {err}", "unsupported") from err


def prepare_image(
    image: Image.Image,
    aspect: str = "pad",
    fill: tuple[int, int, int] = (0, 0, 0),
    background: tuple[int, int, int] = (255, 255, 255),
    exif_transpose: bool = True,
) -> Image.Image:
    """The RGB picture the image processor resizes: upright (EXIF), RGB, and square when ``aspect`` is ``pad``.

    ``pad`` centres the image on a square of colour ``fill`` (LLaVA-1.5's ``expand2square``: the
    image processor's mean colour); ``crop`` leaves the shape to the image processor (resize the
    shortest side, centre-crop). Raises ``ValueError`` for an unknown ``aspect``.
    """
    if aspect not in ASPECTS:
        raise ValueError(f"image_aspect: '{aspect}' is not one of {', '.join(ASPECTS)}")
    if exif_transpose:
        image = ImageOps.exif_transpose(image)
    image = to_rgb(image, background)
    width, height = image.size
    if aspect == "pad" and width != height:
        side = max(width, height)
        square = Image.new("RGB", (side, side), tuple(fill))
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    return image


# ---- 2. the chat template ----------------------------------------------------------------------

# Jinja: build a new message list (the sandbox forbids mutating the old one) and rebind
# ``messages`` to it before the LM's template runs; ``dict(m, content=...)`` keeps the other keys.
# Thinking templates (Qwen3) render PhiClip's chats in non-thinking mode unless the caller asks otherwise: the
# empty think block is then the end of the generation prompt, never part of an answer.
_PREAMBLE = """{%- if enable_thinking is not defined -%}{%- set enable_thinking = false -%}{%- endif -%}
{%- set _pc = namespace(messages=[]) -%}
{%- for _msg in messages -%}
{%- if _msg['content'] is none -%}
{%- set _pc.messages = _pc.messages + [_msg] -%}
{%- elif _msg['content'] is string -%}
{%- set _pc.messages = _pc.messages + [dict(_msg, content=(_msg['content'] | trim))] -%}
{%- else -%}
{%- set _parts = namespace(images='', text='') -%}
{%- for _part in _msg['content'] -%}
{%- if _part['type'] in ('image', 'image_url', 'image_pil') -%}
{%- set _parts.images = _parts.images + '__IMAGE__\\n' -%}
{%- elif _part['type'] == 'text' -%}
{%- set _parts.text = _parts.text + (' ' if _parts.text else '') + _part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set _pc.messages = _pc.messages + [dict(_msg, content=(_parts.images + _parts.text) | trim)] -%}
{%- endif -%}
{%- endfor -%}
__SYSTEM__{%- set messages = _pc.messages -%}
"""

_SYSTEM = """{%- if not _pc.messages or _pc.messages[0]['role'] != 'system' -%}
{%- set _pc.messages = [{'role': 'system', 'content': __PROMPT__}] + _pc.messages -%}
{%- endif -%}
"""

IMAGE_TOKEN = "<image>"  # the marker that stands for one image, in text and in input_ids
IMAGE_PART_TYPES = ("image", "image_url", "image_pil")
_STAND_IN = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in real text
IGNORE_INDEX = -100


def wrap_chat_template(lm_template: str, system_prompt: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
    """The LM's chat template preceded by the content-parts preamble (and a default system prompt)."""
    if not isinstance(lm_template, str) or not lm_template.strip():
        raise ValueError("the tokenizer has no chat template to wrap")
    system = ""
    if system_prompt is not None:
        literal = system_prompt.strip().replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        system = _SYSTEM.replace("__PROMPT__", f"'{literal}'")
    return _PREAMBLE.replace("__IMAGE__", image_token).replace("__SYSTEM__", system) + lm_template


def keep_sentencepiece_model(tokenizer: Any, folder: str | Path) -> None:
    """Copy a SentencePiece LM's ``tokenizer.model`` (Phi-3's, Llama-2's) into ``folder`` when the tokenizer was
    loaded with one and ``folder`` has none: transformers 5 saves only ``tokenizer.json``, and llama.cpp's
    converters read the SentencePiece file."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    target = Path(folder) / "tokenizer.model"
    if vocab_file and Path(vocab_file).name == target.name and Path(vocab_file).is_file() and not target.exists():
        target.write_bytes(Path(vocab_file).read_bytes())


class TemplateError(ValueError):
    """A conversation the chat template cannot turn into a sequence; the message says why."""


def _segments(message: dict, index: int, image_token: str, image_markers: bool) -> list[str | None]:
    """A message's content as text pieces and image slots (``None``), laid out as the preamble renders it.

    A string is literal text, except that with ``image_markers`` (LLaVA records) each ``image_token`` in a
    user turn is an image slot. Content parts put each image first (``<image>\\n``), then the
    text parts joined by spaces. Leading and trailing whitespace is trimmed, as the preamble does.
    """
    content = message.get("content")
    if content is None:
        return []
    if isinstance(content, str):
        if image_markers and message.get("role") == "user":
            pieces = content.split(image_token)
            segments: list[str | None] = [pieces[0]]
            for piece in pieces[1:]:
                segments += [None, piece]
        else:
            segments = [content]
    elif isinstance(content, list):
        texts = []
        segments = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in IMAGE_PART_TYPES:
                segments += [None, "\n"]
            elif kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise TemplateError(f"messages[{index}].content[{j}]: expected an image or text part, got {part!r:.80}")
        segments.append(" ".join(texts))
    else:
        raise TemplateError(f"messages[{index}].content must be a string or a list of parts")
    segments = [s for s in segments if s != ""]
    while segments and isinstance(segments[0], str) and not segments[0].strip():
        segments.pop(0)
    while segments and isinstance(segments[-1], str) and not segments[-1].strip():
        segments.pop()
    if segments and isinstance(segments[0], str):
        segments[0] = segments[0].lstrip()
    if segments and isinstance(segments[-1], str):
        segments[-1] = segments[-1].rstrip()
    return segments


# ---- 3. the processor --------------------------------------------------------------------------


class PhiClipProcessor(ProcessorMixin):
    """``processor(images=..., text=...)`` -> ``input_ids``, ``attention_mask`` (left-padded), ``pixel_values``.

    A text holding ``<image>`` tokens is a rendered prompt, tokenized as it is, one image per token.
    A text without any that comes with images is a question: one user turn, its images first, ready
    for generation. ``apply_chat_template`` takes messages whose content is a string or a list of
    image and text parts (an image part may carry its ``image``, ``url``, ``path`` or ``base64``).

    Image settings, saved in ``processor_config.json``: ``image_aspect`` (``pad`` or ``crop``; a folder
    saved without the key was trained with ``crop``), ``image_background`` (RGB under transparent
    pixels) and ``image_exif_transpose`` (apply the EXIF orientation).
    """

    attributes = ["image_processor", "tokenizer"]
    _auto_class = "AutoProcessor"  # save_pretrained writes the auto_map that trust_remote_code loading needs
    if not hasattr(ProcessorMixin, "get_attributes"):  # transformers 4.x finds sub-processors by these names
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None,
                 image_token: str = IMAGE_TOKEN, image_aspect: str = "crop",
                 image_background: tuple[int, int, int] | list[int] = (255, 255, 255),
                 image_exif_transpose: bool = True, **kwargs: Any) -> None:
        if image_aspect not in ASPECTS:
            raise ValueError(f"image_aspect: '{image_aspect}' is not one of {', '.join(ASPECTS)}")
        self.image_token = image_token
        self.image_aspect = image_aspect
        self.image_background = [int(c) for c in image_background]
        self.image_exif_transpose = bool(image_exif_transpose)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_parts(cls, image_processor, tokenizer, system_prompt: str | None = None, image_token: str = IMAGE_TOKEN,
                   image_aspect: str = "pad") -> "PhiClipProcessor":
        """A processor for a new PhiClip: adds ``<image>`` (and a pad token) to the LM's tokenizer and wraps its template."""
        if tokenizer.chat_template is None:
            raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; PhiClip renders chats with it")
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # One template for everything: the tokenizer's own (text-generation pipelines, training) and the processor's.
        tokenizer.chat_template = wrap_chat_template(tokenizer.chat_template, system_prompt, image_token)
        return cls(image_processor, tokenizer, chat_template=tokenizer.chat_template, image_token=image_token,
                   image_aspect=image_aspect)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    # ---- images --------------------------------------------------------------------------------

    @property
    def pad_colour(self) -> tuple[int, int, int]:
        """The image processor's mean colour in 0-255, truncated as LLaVA does (``int(x * 255)``)."""
        mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        return tuple(int(x * 255) for x in mean)

    def prepare(self, source: Any) -> Image.Image:
        """Any image source (see :func:`open_image`) as the RGB picture this model's image processor resizes."""
        return prepare_image(open_image(source), self.image_aspect, self.pad_colour, tuple(self.image_background),
                             self.image_exif_transpose)

    def image_pixels(self, images: list[Any]) -> Any:
        """``pixel_values`` ``(n_images, 3, H, W)`` float32 for image sources, each prepared by :meth:`prepare`."""
        prepared = [self.prepare(image) for image in images]
        return self.image_processor(images=prepared, return_tensors="pt")["pixel_values"]

    # ---- conversations -------------------------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages``. Raises :class:`TemplateError` with the template's own
        message when it refuses the conversation (``raise_exception``: e.g. Gemma's "System role not supported")."""
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as err:
            if type(err).__module__.startswith("jinja2"):
                raise TemplateError(f"the chat template refuses this conversation: {err}") from err
            raise

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False, image_markers: bool = False
    ) -> tuple[list[int], list[int], list[int]]:
        """Token ids and labels of a conversation, and the token index where each answer ends.

        Every message's text is tokenized as text (a message that spells ``<|im_end|>`` or
        ``<image>`` gets ordinary tokens); only the template's special tokens and image slots get
        special ids. Labels are the ids of each answer plus its end-of-turn marker (read off the
        template: rendering with and without a following user turn), ``-100`` elsewhere. The text
        before each answer is tokenized on its own, so a prompt ends on the same tokens in training
        and generation. ``image_markers``: see :func:`_segments`. Raises :class:`TemplateError`.
        """
        segments = [_segments(m, i, self.image_token, image_markers) for i, m in enumerate(messages)]
        stand_ins = [dict(m, content=f"\ue000{i}\ue001") if m.get("content") is not None else m
                     for i, m in enumerate(messages)]
        full = self.render(stand_ins, add_generation_prompt)
        for i, m in enumerate(messages):
            if m.get("content") is not None and full.count(f"\ue000{i}\ue001") != 1:
                raise TemplateError(f"the chat template does not write messages[{i}] ({m.get('role')}) once, verbatim")
        spans = [self._answer_span(stand_ins, i, full) for i, m in enumerate(messages)
                 if m.get("role") == "assistant" and m.get("content") is not None]
        ids: list[int] = []
        labels: list[int] = []
        ends: list[int] = []
        at = 0
        for start, stop in [*spans, (len(full), len(full))]:
            for lo, hi, supervised in ((at, start, False), (start, stop, True)):
                text = full[lo:hi]
                if ids and self._strips(ids[-1])[1]:  # a special token that eats the whitespace after it
                    text = text.lstrip()
                if text:
                    piece = self._tokenize_rendered(text, segments, at_start=lo == 0)
                    ids += piece
                    labels += piece if supervised else [IGNORE_INDEX] * len(piece)
            if stop > start:
                ends.append(len(ids))
            at = stop
        return ids, labels, ends

    def _answer_span(self, messages: list[dict], i: int, full: str) -> tuple[int, int]:
        """Character span of answer ``i`` in ``full``: its text and the template's end-of-turn marker after it.

        Whatever the template writes before the answer's text (a role header, Qwen3's empty think block)
        belongs to the prompt. The end-of-turn marker is read off the template: what follows the answer both
        when it ends the conversation and when a user turn follows it. Templates that render an answer
        differently once later turns follow (Qwen3 drops the think block of earlier answers) are read
        where the answer stands, in ``full``.
        """
        asked = [m["content"] for m in messages[:i] if m.get("content") is not None]
        if asked:  # the turns before the answer, up to its question's text, as the template writes them alone
            before = self.render(messages[:i], add_generation_prompt=True)
            if not full.startswith(before[: before.rindex(asked[-1]) + len(asked[-1])]):
                raise TemplateError("the chat template renders earlier turns differently once later turns follow")
        answer = messages[i]["content"]  # a stand-in, written once in each rendering (checked by encode_chat)
        start = full.index(answer)
        after = start + len(answer)

        def tail(rendered: str) -> str:
            return rendered[rendered.index(answer) + len(answer):]

        last = tail(self.render(messages[: i + 1]))
        followed = tail(self.render(messages[: i + 1] + [{"role": "user", "content": "\ue002"}]))
        a = self.tokenizer(last, add_special_tokens=False, return_offsets_mapping=True)
        b = self.tokenizer(followed, add_special_tokens=False)["input_ids"]
        shared = 0
        while shared < min(len(a["input_ids"]), len(b)) and a["input_ids"][shared] == b[shared]:
            shared += 1
        marker = last[: a["offset_mapping"][shared - 1][1] if shared else 0].rstrip()
        if not full.startswith(marker, after):
            raise TemplateError(f"the chat template closes answer {i} differently once later turns follow")
        return start, after + len(marker)

    def _tokenize_rendered(self, text: str, segments: list[list[str | None]], at_start: bool = True) -> list[int]:
        """Ids of rendered template text in which message stand-ins are replaced by their segments.

        The template's own text keeps its special tokens; message text is split into ordinary tokens.
        Text between two special tokens is tokenized as one piece, as the tokenizer itself would.
        ``at_start``: ``text`` opens the conversation (else it continues it: see :meth:`_text_ids`).
        """
        specials = self._special_tokens()
        pattern = "|".join([_STAND_IN.pattern] + [re.escape(s) for s in sorted(specials, key=len, reverse=True)])
        atoms: list[str | int] = []  # text, or a token id
        at = 0
        for match in re.finditer(pattern, text):
            atoms.append(text[at:match.start()])
            if match.group(1) is not None:
                for segment in segments[int(match.group(1))]:
                    atoms.append(self.image_token_id if segment is None else segment)
            else:
                atoms.append(specials[match.group(0)])
            at = match.end()
        atoms.append(text[at:])
        ids: list[int] = []
        run = ""
        opening = at_start  # the run opens the conversation: nothing before it
        for k, atom in enumerate(atoms):
            if isinstance(atom, str):
                run += atom
                continue
            lstrip, rstrip = self._strips(atom)
            ids += self._text_ids(run.rstrip() if lstrip else run, opening)
            ids.append(atom)
            run, opening = "", False
            if rstrip and k + 1 < len(atoms) and isinstance(atoms[k + 1], str):
                atoms[k + 1] = atoms[k + 1].lstrip()
        return ids + self._text_ids(run, opening)

    def _text_ids(self, text: str, at_start: bool, split_special_tokens: bool = True) -> list[int]:
        """Ids of ``text`` as the tokenizer gives them inside a whole prompt: a SentencePiece tokenizer that
        marks only the start of its input with a word boundary ("▁": Metaspace ``prepend_scheme: first``,
        Mistral v0.3's) does not mark text that follows a special token or other text."""
        if not text:
            return []
        continuation = None if at_start else self._continuation_tokenizer(split_special_tokens)
        if continuation is None:
            return self.tokenizer(text, add_special_tokens=False,
                                  split_special_tokens=split_special_tokens)["input_ids"]
        return continuation.encode(text, add_special_tokens=False).ids

    def _continuation_tokenizer(self, split_special_tokens: bool):
        """The tokenizer's pipeline (``tokenizers.Tokenizer``) with Metaspace's ``prepend_scheme: first`` as
        ``never``, special tokens split or not; None when it has no such step (its pieces tokenize alike wherever
        they stand). Built once per setting, never changed after (callers may share the processor across threads)."""
        cache = self.__dict__.setdefault("_continuation", {})
        if split_special_tokens not in cache:
            backend = getattr(self.tokenizer, "backend_tokenizer", None)
            spec = json.loads(backend.to_str()) if backend is not None else {}
            found = False

            def never(node: Any) -> None:
                nonlocal found
                if isinstance(node, dict):
                    if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                        node["prepend_scheme"] = "never"
                        found = True
                    for value in node.values():
                        never(value)
                elif isinstance(node, list):
                    for value in node:
                        never(value)

            never(spec)
            continuation = type(backend).from_str(json.dumps(spec)) if found else None
            if continuation is not None:
                continuation.encode_special_tokens = split_special_tokens
            cache[split_special_tokens] = continuation
        return cache[split_special_tokens]

    def _special_tokens(self) -> dict[str, int]:
        """The tokenizer's special added tokens (string -> id), except the image token."""
        return {tok.content: i for i, tok in self.tokenizer.added_tokens_decoder.items()
                if tok.special and tok.content != self.image_token}

    def _strips(self, token_id: int) -> tuple[bool, bool]:
        token = self.tokenizer.added_tokens_decoder.get(token_id)
        return (bool(getattr(token, "lstrip", False)), bool(getattr(token, "rstrip", False))) if token else (False, False)

    def _images_per_text(self, texts: list[str], images: Any) -> list[list[Any]]:
        if images is None:
            return [[] for _ in texts]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} lists of images for {len(texts)} texts")
            return [list(item) for item in images]
        images = list(images)
        if len(texts) == 1:
            return [images]
        markers = [text.count(self.image_token) for text in texts]
        if len(images) == len(texts) and not any(markers):
            return [[image] for image in images]
        if sum(markers) != len(images):
            raise ValueError(f"{len(images)} images for {sum(markers)} {self.image_token} tokens in {len(texts)} texts")
        out, at = [], 0
        for n in markers:
            out.append(images[at:at + n])
            at += n
        return out

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = None,
                 padding: bool | str = True, **kwargs: Any) -> BatchFeature:
        if text is None:
            raise ValueError("text is required: a question, or a prompt with one <image> token per image")
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._images_per_text(texts, images)
        rows = []
        for i, (prompt, its_images) in enumerate(zip(texts, per_text)):
            markers = prompt.count(self.image_token)
            if its_images and markers == 0:
                content = [{"type": "image"} for _ in its_images] + [{"type": "text", "text": prompt}]
                rows.append(self.encode_chat([{"role": "user", "content": content}], add_generation_prompt=True)[0])
            elif markers != len(its_images):
                raise ValueError(f"text {i}: {markers} {self.image_token} token(s) but {len(its_images)} image(s)")
            else:
                rows.append(self._tokenize(prompt))
        return self._batch(rows, [image for its_images in per_text for image in its_images], return_tensors, padding,
                           kwargs.get("padding_side", "left"))

    def _batch(self, rows: list[list[int]], images: list[Any], return_tensors: str | None, padding: bool | str,
               padding_side: str = "left") -> BatchFeature:
        if padding:
            encoded = self.tokenizer.pad({"input_ids": rows}, padding=padding, padding_side=padding_side)
            data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        else:
            data = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
        if images:
            data["pixel_values"] = self.image_pixels(images)
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(self, conversation, chat_template: str | None = None, **kwargs: Any):
        """As transformers' ``apply_chat_template``; with ``tokenize=True``, tokenized by :meth:`encode_chat`
        (message text stays text) and each image part's source prepared by :meth:`prepare`."""
        if not kwargs.get("tokenize", False) or chat_template is not None:
            kwargs.pop("processor_kwargs", None)
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        unknown = set(kwargs) - {"tokenize", "return_dict", "return_tensors", "add_generation_prompt", "padding",
                                 "processor_kwargs", "continue_final_message", "padding_side"}
        if unknown:
            raise ValueError(f"apply_chat_template: unsupported argument(s) {', '.join(sorted(unknown))}")
        if kwargs.get("continue_final_message"):
            raise ValueError("apply_chat_template: continue_final_message is not supported (PhiClip opens a new answer)")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        rows, images = [], []
        for messages in conversations:
            rows.append(self.encode_chat(messages, add_generation_prompt=kwargs.get("add_generation_prompt", False))[0])
            for m in messages:
                if isinstance(m.get("content"), list):
                    for part in m["content"]:
                        if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                            images.append(_part_source(part))
        batch = self._batch(rows, images, kwargs.get("return_tensors"), kwargs.get("padding", True) or True,
                            kwargs.get("padding_side", "left"))
        if not images and kwargs.get("return_tensors") == "pt":
            # An empty (0, 3, H, W) batch of images: a pipeline can then batch text-only chats with image chats.
            batch["pixel_values"] = self.image_pixels([Image.new("RGB", (1, 1))])[:0]
        if kwargs.get("return_dict", False):
            return batch
        return batch["input_ids"] if batched else batch["input_ids"][0]

    def _tokenize(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, cut where answers start, as training tokenizes it.

        Training tokenizes the text before each answer on its own, so an inference prompt ends
        on the same tokens (Llama-3's ``"\n\n"`` would otherwise merge with the answer's first
        characters). Answers start right after the template's generation prompt.
        """
        marker = self._generation_prompt()
        pieces, at = [], 0
        while marker and (found := prompt.find(marker, at)) >= 0:
            pieces.append(prompt[at:found + len(marker)])
            at = found + len(marker)
        pieces.append(prompt[at:])
        ids: list[int] = []
        for k, piece in enumerate(pieces):  # a rendered prompt: its special tokens are the template's
            ids.extend(self._text_ids(piece, at_start=k == 0, split_special_tokens=False))
        return ids

    def _generation_prompt(self) -> str:
        """The text the chat template appends to open an assistant turn ("" if it cannot be isolated)."""
        probe = [{"role": "user", "content": "x"}]
        opened = self.render(probe, add_generation_prompt=True)
        closed = self.render(probe)
        return opened[len(closed):] if opened.startswith(closed) else ""

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Also keeps ``tokenizer_config.json`` readable by transformers 4.x, which knows neither the
        ``TokenizersBackend`` class name 5.x writes nor ``extra_special_tokens`` given as a list, and a
        SentencePiece LM's ``tokenizer.model`` (Phi-3's, Llama-2's), which 5.x no longer writes but
        llama.cpp's converters read."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        keep_sentencepiece_model(self.tokenizer, save_directory)
        path = Path(save_directory) / "tokenizer_config.json"
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            if config.get("tokenizer_class") == "TokenizersBackend":
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
            if isinstance(config.get("extra_special_tokens"), list):
                config["additional_special_tokens"] = config.pop("extra_special_tokens")
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs: Any):
        """Decoded text of each row of ``generate()``'s output (prompt included, as the pipeline expects)."""
        if getattr(generated_outputs, "ndim", 2) == 1:
            return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)


def _part_source(part: dict) -> Any:
    """The image an image part carries (``image``, ``url``, ``path``, ``base64`` or OpenAI's ``image_url``)."""
    for key in ("image", "url", "path", "base64"):
        if part.get(key) is not None:
            return part[key]
    spec = part.get("image_url")
    if spec is not None:
        return spec.get("url") if isinstance(spec, dict) else spec
    raise ValueError(f"image part without an image: {part!r:.80}")
