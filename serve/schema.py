"""Read an OpenAI-style chat completion request into a :class:`~serve.jobs.Job`.

Every field is either honoured or refused with a 400 whose ``param`` names it (vLLM's
validation is the model); nothing is silently ignored. :data:`HONOURED` lists what is
accepted, :data:`REFUSED` what is known and not supported (with the reason), and any other
field is refused as unknown. A field sent as ``null`` counts as not sent.

Message content is a string or a list of parts: ``text``, ``image_url`` (a ``data:`` URL;
remote URLs are refused) and ``input_audio`` (base64 audio, transcribed). Any user message
may carry images, up to ``Limits.max_images`` per conversation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from chat import json_grammar
from chat.assistant import GenerationSettings
from serve.errors import ServeError, bad_request
from serve.inputs import Limits, clean_text, decode_base64, decode_data_url, decode_image
from serve.jobs import Job
from serve.postprocess import Options as PostOptions

MAX_MESSAGES = 256
MAX_TOKENS = 4096
MAX_N = 8
MAX_STOP = 4
Transcribe = Callable[[bytes, str], str]  # (audio bytes, param name) -> text

HONOURED = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream",
    "stream_options", "stop", "seed", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty",
    "logit_bias", "response_format", "user",
    # phiclip's own
    "repetition_penalty", "refine", "postprocess", "drop_punctuation",
)
_NO_TOOLS = "tool and function calls are not supported: this model was not trained to call tools"
REFUSED = {
    "tools": _NO_TOOLS,
    "tool_choice": _NO_TOOLS,
    "parallel_tool_calls": _NO_TOOLS,
    "functions": _NO_TOOLS,
    "function_call": _NO_TOOLS,
    "audio": "audio output is not supported: the server answers in text",
    "modalities": "only text output is supported (modalities: [\"text\"])",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model has no separate reasoning phase to set an effort for",
    "verbosity": "this model has no verbosity setting; ask for it in the prompt",
    "web_search_options": "web search is not supported",
    "store": "stored completions are not supported (store: false is fine)",
    "metadata": "stored completions are not supported, so there is nothing to attach metadata to",
    "service_tier": "this server has one service tier",
    "prompt_cache_key": "this server keeps no prompt cache",
    "safety_identifier": "this server does no safety monitoring to attach an identifier to",
}
# values of refused fields that ask for exactly what the server does anyway
_SAME_AS_DEFAULT = {"tools": ([],), "functions": ([],), "modalities": (["text"],), "store": (False,)}


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


def check_fields(data: dict[str, Any]) -> None:
    """Refuse, by name, every field the server does not honour (``null`` counts as absent)."""
    for key, value in data.items():
        if value is None or key in HONOURED:
            continue
        if key in REFUSED:
            if value in _SAME_AS_DEFAULT.get(key, ()):
                continue
            raise bad_request(f"{key} is not supported: {REFUSED[key]}", key, "unsupported_parameter")
        raise bad_request(
            f"unknown field {key!r}: this server does not implement it (see the README's table of API settings)",
            key,
            "unsupported_parameter",
        )


def parse_chat(data: dict[str, Any], served: list[str], limits: Limits, transcribe: Transcribe | None) -> ChatRequest:
    check_fields(data)
    model = _required(data, "model", str)
    if model not in served:
        raise model_not_found(model, served)
    raw_messages = _required(data, "messages", list)
    if len(raw_messages) > MAX_MESSAGES:
        raise bad_request(f"too many messages ({len(raw_messages)}; at most {MAX_MESSAGES})", "messages")
    images: list[tuple[str, Image.Image]] = []
    messages = [_message(m, f"messages[{i}]", images, limits, transcribe) for i, m in enumerate(raw_messages)]
    n = _optional(data, "n", int, 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N}, got {n}", "n")
    stream = _optional(data, "stream", bool, False)
    options = _optional(data, "stream_options", dict, None) or {}
    for key in options:
        if key != "include_usage":
            raise bad_request(f"stream_options.{key} is not supported (only include_usage)", f"stream_options.{key}")
    include_usage = _optional(options, "include_usage", bool, False, "stream_options.include_usage")
    if options and not stream:
        raise bad_request("stream_options needs stream: true", "stream_options")
    logprobs = _optional(data, "logprobs", bool, False)
    top_logprobs = _optional(data, "top_logprobs", int, 0)
    if not 0 <= top_logprobs <= 20:
        raise bad_request(f"top_logprobs must be between 0 and 20, got {top_logprobs}", "top_logprobs")
    if "top_logprobs" in data and data["top_logprobs"] is not None and not logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    post = PostOptions(
        clean=_optional(data, "postprocess", bool, False),
        drop_punctuation=_optional(data, "drop_punctuation", bool, False),
    )
    if logprobs and post.active:
        raise bad_request(
            "logprobs cannot be combined with postprocess or drop_punctuation: they change the text "
            "whose tokens the logprobs describe",
            "logprobs",
        )
    settings = GenerationSettings(
        max_new_tokens=_max_tokens(data),
        temperature=_number(data, "temperature", 0.0, 0.0, 2.0),
        top_p=_top_p(data),
        repetition_penalty=_number(data, "repetition_penalty", 1.0, 0.5, 2.0),
        stop=_stop(data),
        seed=_seed(data),
        presence_penalty=_number(data, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(data),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        json_schema=_json_schema(data),
    )
    _optional(data, "user", str, None)
    job = Job(
        messages=messages,
        images=[image for _, image in images],
        settings=settings,
        n=n,
        refine=_optional(data, "refine", bool, False),
        post=post,
    )
    return ChatRequest(job=job, model=model, stream=stream, include_usage=include_usage)


# settings -------------------------------------------------------------------------------------
def _max_tokens(data: dict) -> int:
    new = _optional(data, "max_completion_tokens", int, None)
    old = _optional(data, "max_tokens", int, None)
    if new is not None and old is not None and new != old:
        raise bad_request(
            f"max_completion_tokens ({new}) and max_tokens ({old}) disagree; send one of them", "max_tokens"
        )
    value, name = (new, "max_completion_tokens") if new is not None else (old, "max_tokens")
    if value is None:
        return 256
    if not 1 <= value <= MAX_TOKENS:
        raise bad_request(f"{name} must be between 1 and {MAX_TOKENS}, got {value}", name)
    return value


def _top_p(data: dict) -> float:
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise bad_request("top_p must be greater than 0", "top_p")
    return top_p


def _stop(data: dict) -> tuple[str, ...]:
    value = data.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop strings must not be empty", "stop")
    return tuple(stops)


def _seed(data: dict) -> int | None:
    seed = _optional(data, "seed", int, None)
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise bad_request("seed must be a 64-bit integer", "seed")
    return seed


def _logit_bias(data: dict) -> dict[int, float]:
    raw = _optional(data, "logit_bias", dict, None) or {}
    out = {}
    for key, value in raw.items():
        where = f"logit_bias.{key}"
        if not key.isdigit():
            raise bad_request(f"logit_bias keys must be token ids (digits), got {key!r}", where)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise bad_request(f"{where} must be a number between -100 and 100, got {json.dumps(value)[:40]}", where)
        out[int(key)] = float(value)
    return out


def _json_schema(data: dict) -> dict | None:
    """The schema an answer must match (``{"type": "object"}`` for json_object), checked by llguidance."""
    spec = _optional(data, "response_format", dict, None)
    if spec is None:
        return None
    kind = _required(spec, "type", str, "response_format")
    for key in spec:
        if key not in ("type", "json_schema"):
            raise bad_request(f"response_format.{key} is not a response_format field", f"response_format.{key}")
    if kind == "text":
        return None
    if kind == "json_object":
        schema, where = {"type": "object"}, "response_format"
    elif kind == "json_schema":
        spec = _required(spec, "json_schema", dict, "response_format")
        for key in spec:
            if key not in ("name", "schema", "strict", "description"):
                raise bad_request(
                    f"response_format.json_schema.{key} is not a json_schema field", f"response_format.json_schema.{key}"
                )
        _required(spec, "name", str, "response_format.json_schema")
        _optional(spec, "strict", bool, None, "response_format.json_schema.strict")  # the schema is always enforced
        schema = _optional(spec, "schema", dict, {}, "response_format.json_schema.schema")
        where = "response_format.json_schema.schema"
    else:
        raise bad_request(
            f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format.type"
        )
    if not json_grammar.available():
        raise bad_request(
            "JSON answers need llguidance on the server (pip install 'phiclip[serve]')", "response_format"
        )
    try:
        json_grammar.compile_schema(schema)
    except ValueError as err:
        raise bad_request(str(err), where) from err
    return schema


# messages -------------------------------------------------------------------------------------
_MESSAGE_FIELDS = ("role", "content")
_PART_FIELDS = {"text": ("type", "text"), "image_url": ("type", "image_url"), "input_audio": ("type", "input_audio")}


def _message(m: Any, where: str, images: list, limits: Limits, transcribe: Transcribe | None) -> dict:
    """``{"role", "content"}``: content is the text, or a list of image and text parts when it has images."""
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with role and content", where)
    role = _required(m, "role", str, where)
    role = "system" if role == "developer" else role
    if role not in ("system", "user", "assistant"):
        raise bad_request(
            f"{where}.role must be system, developer, user or assistant, got {role!r}"
            + (" (tool calls are not supported)" if role in ("tool", "function") else ""),
            f"{where}.role",
        )
    for key, value in m.items():
        if key not in _MESSAGE_FIELDS and value is not None:
            reason = _NO_TOOLS if key in ("tool_calls", "function_call", "tool_call_id") else "the chat template has no place for it"
            raise bad_request(f"{where}.{key} is not supported: {reason}", f"{where}.{key}")
    content = m.get("content")
    if content is None:
        raise bad_request(f"{where}.content is missing", f"{where}.content")
    if isinstance(content, str):
        return {"role": role, "content": clean_text(content)}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    parts: list[dict] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{at} must be an object with a type", at)
        kind = _required(part, "type", str, at)
        if kind not in _PART_FIELDS:
            raise bad_request(f"{at}.type {kind!r} is not supported (use text, image_url or input_audio)", f"{at}.type")
        for key in part:
            if key not in _PART_FIELDS[kind]:
                raise bad_request(f"{at}.{key} is not a field of a {kind} part", f"{at}.{key}")
        if kind == "text":
            parts.append({"type": "text", "text": clean_text(_required(part, "text", str, at))})
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: images are only accepted in user messages", at)
            images.append((at, _image(part, at, len(images), limits)))
            parts.append({"type": "image"})
        else:
            if role != "user":
                raise bad_request(f"{at}: audio is only accepted in user messages", at)
            if transcribe is None:
                raise bad_request("this server has no speech recognition; send text instead", at)
            spec = _required(part, "input_audio", dict, at)
            for key in spec:
                if key not in ("data", "format"):
                    raise bad_request(f"{at}.input_audio.{key} is not an input_audio field", f"{at}.input_audio.{key}")
            _optional(spec, "format", str, None, f"{at}.input_audio.format")  # the bytes tell their format
            audio = decode_base64(_required(spec, "data", str, f"{at}.input_audio"), limits, f"{at}.input_audio.data")
            parts.append({"type": "text", "text": transcribe(audio, f"{at}.input_audio.data")})
    if not any(p["type"] == "image" for p in parts):
        return {"role": role, "content": "\n".join(p["text"] for p in parts if p["text"])}
    return {"role": role, "content": [p for p in parts if p["type"] == "image" or p["text"]]}


def _image(part: dict, at: str, seen: int, limits: Limits) -> Image.Image:
    if seen >= limits.max_images:
        raise bad_request(
            f"too many images: this server takes at most {limits.max_images} per conversation "
            f"(--max-images); {at} is one more",
            at,
            "too_many_images",
        )
    spec = part.get("image_url")
    if isinstance(spec, dict):
        for key in spec:
            if key not in ("url", "detail"):
                raise bad_request(f"{at}.image_url.{key} is not an image_url field", f"{at}.image_url.{key}")
        detail = _optional(spec, "detail", str, "auto", f"{at}.image_url.detail")
        if detail != "auto":
            raise bad_request(
                f"{at}.image_url.detail {detail!r} is not supported: every image is seen at the vision tower's "
                "one resolution (send 'auto' or leave it out)",
                f"{at}.image_url.detail",
            )
        url = spec.get("url")
    else:
        url = spec
    if not isinstance(url, str):
        raise bad_request(f"{at}.image_url.url is missing", f"{at}.image_url.url")
    _, data = decode_data_url(url, limits, f"{at}.image_url.url")  # the bytes tell the format, not the MIME type
    return decode_image(data, limits, f"{at}.image_url.url")


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
