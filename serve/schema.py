"""Read an OpenAI-style chat completion request into a :class:`~serve.engine.Job`.

Accepted, beyond ``model`` and ``messages``: ``max_tokens`` (or ``max_completion_tokens``),
``temperature``, ``top_p``, ``stream``, ``stream_options.include_usage``, ``n`` (1 only),
and the phiclip switches ``refine``, ``postprocess``, ``drop_punctuation`` and
``repetition_penalty``. Other OpenAI fields are ignored. Message content is a string or a
list of parts: ``text``, ``image_url`` (a ``data:`` URL; remote URLs are refused) and
``input_audio`` (base64 audio, transcribed). A conversation carries at most one image.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from chat.assistant import GenerationSettings
from serve.engine import Job
from serve.errors import ServeError, bad_request
from serve.inputs import (
    Limits,
    clean_text,
    decode_base64,
    decode_data_url,
    decode_image,
)
from serve.postprocess import Options as PostOptions

MAX_MESSAGES = 256
MAX_TOKENS = 4096
Transcribe = Callable[[bytes, str], str]  # (audio bytes, param name) -> text


@dataclass
class ChatRequest:
    job: Job
    model: str
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError as err:
        raise bad_request(f"the request body is not UTF-8 text: {err}") from err
    except json.JSONDecodeError as err:
        raise bad_request(f"malformed JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def model_not_found(name: str, served: list[str]) -> ServeError:
    return ServeError(
        f"the model {name!r} does not exist; this server serves {', '.join(repr(s) for s in served)}",
        404,
        "invalid_request_error",
        "model",
        "model_not_found",
    )


def parse_chat(data: dict[str, Any], served: list[str], limits: Limits, transcribe: Transcribe | None) -> ChatRequest:
    model = _required(data, "model", str)
    if model not in served:
        raise model_not_found(model, served)
    raw_messages = _required(data, "messages", list)
    if len(raw_messages) > MAX_MESSAGES:
        raise bad_request(f"too many messages ({len(raw_messages)}; at most {MAX_MESSAGES})", "messages")
    images: list[tuple[str, Image.Image]] = []
    messages = [_message(m, f"messages[{i}]", images, limits, transcribe) for i, m in enumerate(raw_messages)]
    if len(images) > 1:
        raise bad_request(
            f"this model takes one image per conversation; got {len(images)} (at {', '.join(p for p, _ in images)})",
            images[1][0],
        )
    n = _optional(data, "n", int, 1)
    if n != 1:
        raise bad_request("only n=1 is supported", "n")
    max_tokens = _optional(data, "max_completion_tokens", int, None)
    max_tokens = _optional(data, "max_tokens", int, max_tokens if max_tokens is not None else 256)
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise bad_request(f"max_tokens must be between 1 and {MAX_TOKENS}, got {max_tokens}", "max_tokens")
    temperature = _number(data, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p must be greater than 0", "top_p")
    repetition_penalty = _number(data, "repetition_penalty", 1.0, 0.5, 2.0)
    stream = _optional(data, "stream", bool, False)
    options = _optional(data, "stream_options", dict, None) or {}
    include_usage = _optional(options, "include_usage", bool, False, "stream_options.include_usage")
    job = Job(
        messages=messages,
        image=images[0][1] if images else None,
        settings=GenerationSettings(max_tokens, temperature, top_p, repetition_penalty),
        refine=_optional(data, "refine", bool, False),
        post=PostOptions(
            clean=_optional(data, "postprocess", bool, False),
            drop_punctuation=_optional(data, "drop_punctuation", bool, False),
        ),
    )
    return ChatRequest(job=job, model=model, stream=stream, include_usage=include_usage)


def _message(m: Any, where: str, images: list, limits: Limits, transcribe: Transcribe | None) -> dict[str, str]:
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with role and content", where)
    role = _required(m, "role", str, where)
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise bad_request(f"{where}.role must be system, user or assistant, got {role!r}", f"{where}.role")
    content = m.get("content")
    if content is None:
        raise bad_request(f"{where}.content is missing", f"{where}.content")
    if isinstance(content, str):
        return {"role": role, "content": clean_text(content)}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{at} must be an object with a type", at)
        kind = _required(part, "type", str, at)
        if kind == "text":
            texts.append(clean_text(_required(part, "text", str, at)))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: images are only accepted in user messages", at)
            spec = part.get("image_url")
            url = spec.get("url") if isinstance(spec, dict) else spec
            if not isinstance(url, str):
                raise bad_request(f"{at}.image_url.url is missing", f"{at}.image_url.url")
            _, data = decode_data_url(url, limits, f"{at}.image_url.url")
            images.append((at, decode_image(data, limits, f"{at}.image_url.url")))
        elif kind == "input_audio":
            if role != "user":
                raise bad_request(f"{at}: audio is only accepted in user messages", at)
            if transcribe is None:
                raise bad_request("this server has no speech recognition; send text instead", at)
            spec = _required(part, "input_audio", dict, at)
            audio = decode_base64(_required(spec, "data", str, f"{at}.input_audio"), limits, f"{at}.input_audio.data")
            texts.append(transcribe(audio, f"{at}.input_audio.data"))
        else:
            raise bad_request(f"{at}.type {kind!r} is not supported (use text, image_url or input_audio)", f"{at}.type")
    return {"role": role, "content": "\n".join(t for t in texts if t)}


_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "true or false", int: "an integer"}


def _check_type(value: Any, kind: type, where: str) -> Any:
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise bad_request(
            f"{where} must be {_TYPE_NAMES.get(kind, kind.__name__)}, got {json.dumps(value)[:40]}", where
        )
    return value


def _required(data: dict, key: str, kind: type, where: str = "") -> Any:
    path = f"{where}.{key}" if where else key
    if key not in data or data[key] is None:
        raise bad_request(f"missing required field: {path}", path)
    return _check_type(data[key], kind, path)


def _optional(data: dict, key: str, kind: type, default: Any, path: str | None = None) -> Any:
    if data.get(key) is None:
        return default
    return _check_type(data[key], kind, path or key)


def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{key} must be a number, got {json.dumps(value)[:40]}", key)
    if not low <= value <= high:
        raise bad_request(f"{key} must be between {low:g} and {high:g}, got {value:g}", key)
    return float(value)
