"""The API's settings through a real server: each honoured as the model would (checked against a direct
VisionChat) or refused with a 400 naming the field; several images per conversation; data URLs as clients
send them."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from live_server import LiveServer
from PIL import Image
from test_serve_api import data_url, image_message, png_bytes, stream_chunks

from chat.assistant import GenerationSettings, VisionChat
from serve.config import ServeConfig
from serve.server import build_app, load_engine

SEA = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def reference(serve_run) -> VisionChat:
    return VisionChat.load(serve_run)


@pytest.fixture(scope="module")
def client(serve_run):
    config = ServeConfig(ui=False, whisper_model=None, max_images=3)
    engine = load_engine(serve_run, config)
    with LiveServer(build_app(engine, None, config)) as live, httpx.Client(base_url=live.url, timeout=120) as c:
        yield c
    engine.close()


def ask(client, messages=SEA, **fields) -> dict:
    response = client.post("/v1/chat/completions", json={"model": "phiclip", "messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def texts(body: dict) -> list[str]:
    return [c["message"]["content"] for c in body["choices"]]


def expected(reference: VisionChat, messages=SEA, images=None, **settings):
    return reference.complete([messages], [images], GenerationSettings(**settings))[0]


# stop ------------------------------------------------------------------------------------------
def test_stop_strings_cut_the_answer_streamed_and_not(client, reference):
    free = expected(reference, max_new_tokens=24).text
    words = free.split(" ")
    stop = f"{words[2]} {words[3][:3]}"  # spans tokens
    body = ask(client, max_tokens=24, stop=[stop, "never appears"])
    assert texts(body) == [free[: free.index(stop)].strip()]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 24
    chunks, pieces = stream_chunks(client, SEA, max_tokens=24, stop=stop)
    assert "".join(pieces) == texts(body)[0]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    # a plain string works as well as a list; the answer without stop runs to the limit
    assert texts(ask(client, max_tokens=24, stop=stop)) == texts(body)
    assert ask(client, max_tokens=24)["choices"][0]["finish_reason"] == "length"


# n and seed ------------------------------------------------------------------------------------
def test_n_choices_with_a_seed_are_reproducible(client, reference):
    fields = {"max_tokens": 10, "temperature": 1.0, "seed": 42}
    body = ask(client, n=3, **fields)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert texts(ask(client, n=3, **fields)) == texts(body)  # same seed, same texts
    for i, text in enumerate(texts(body)):  # choice i is the request with seed + i
        assert text == expected(reference, max_new_tokens=10, temperature=1.0, seed=42 + i).text
    assert len(set(texts(body))) > 1
    assert texts(ask(client, **fields | {"seed": 43})) == texts(body)[1:2]
    assert body["usage"]["completion_tokens"] == sum(
        len(expected(reference, max_new_tokens=10, temperature=1.0, seed=42 + i).token_ids) for i in range(3)
    )


def test_streamed_choices_arrive_each_under_its_index(client):
    fields = {"max_tokens": 10, "temperature": 1.0, "seed": 5, "n": 2}
    plain = texts(ask(client, **fields))
    chunks, _ = stream_chunks(client, SEA, **fields)
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in mine) == plain[i]
        assert mine[-1]["finish_reason"] in ("stop", "length")


# logprobs --------------------------------------------------------------------------------------
def test_logprobs_in_openais_shape_streamed_and_not(client, reference):
    body = ask(client, max_tokens=6, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    direct = expected(reference, max_new_tokens=6, logprobs=True, top_logprobs=2).logprobs
    assert [e["token"] for e in content] == [d.token for d in direct]
    assert [e["logprob"] for e in content] == pytest.approx([d.logprob for d in direct], abs=1e-4)
    for entry, d in zip(content, direct):
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert [t["token"] for t in entry["top_logprobs"]] == [t for t, _ in d.top]
        assert len(entry["top_logprobs"]) == 2
    chunks, _ = stream_chunks(client, SEA, max_tokens=6, logprobs=True, top_logprobs=2)
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    assert ask(client, max_tokens=2)["choices"][0]["logprobs"] is None


# penalties, bias, JSON -------------------------------------------------------------------------
def test_penalties_and_logit_bias_are_applied_as_the_model_would(client, reference):
    token = reference.tokenizer.encode(" ocean", add_special_tokens=False)[0]
    fields = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "logit_bias": {str(token): 8.0}}
    body = ask(client, max_tokens=16, **fields)
    direct = expected(reference, max_new_tokens=16, presence_penalty=1.5, frequency_penalty=0.5,
                      logit_bias={token: 8.0})
    assert texts(body) == [direct.text]
    assert texts(body) != [expected(reference, max_new_tokens=16).text]


SCHEMA = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sides": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["colour", "sides"],
    "additionalProperties": False,
}


def test_response_format_json_schema_and_json_object(client):
    body = ask(client, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}})
    value = json.loads(texts(body)[0])
    assert value["colour"] in ("red", "green", "blue") and 0 <= value["sides"] <= 9
    obj = ask(client, max_tokens=60, response_format={"type": "json_object"})
    if obj["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(texts(obj)[0]), dict)
    else:  # cut at the token limit: still the start of an object
        assert texts(obj)[0].startswith("{")
    assert texts(ask(client, max_tokens=8, response_format={"type": "text"})) == texts(ask(client, max_tokens=8))


# refused ---------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
REFUSED = [
    ({"tools": [TOOL]}, "tools", "not supported"),
    ({"tool_choice": "auto"}, "tool_choice", "not supported"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls", "not supported"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", "not supported"),
    ({"modalities": ["text", "audio"]}, "modalities", "not supported"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction", "not supported"),
    ({"reasoning_effort": "low"}, "reasoning_effort", "not supported"),
    ({"store": True}, "store", "not supported"),
    ({"top_k": 5}, "top_k", "unknown field 'top_k'"),
    ({"best_of": 2}, "best_of", "unknown field"),
    ({"n": 0}, "n", "between 1 and 8"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [""]}, "stop", "must not be empty"),
    ({"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"logprobs": True, "postprocess": True}, "logprobs", "cannot be combined"),
    ({"presence_penalty": 3}, "presence_penalty", "between -2 and 2"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc", "token ids"),
    ({"logit_bias": {"1": 101}}, "logit_bias.1", "between -100 and 100"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside the model's vocabulary"),
    ({"seed": 2**64}, "seed", "64-bit"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens", "disagree"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "needs stream: true"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats",
     "not supported"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "text, json_object or json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema", "nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "missing required field"),
    ({"messages": [{"role": "user", "content": "Hi", "name": "ann"}]}, "messages[0].name", "not supported"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role", "tool calls"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {}}]}]},
     "messages[0].content[0].cache_control", "not a field"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes()), "detail": "high"}}]}]},
     "messages[0].content[0].image_url.detail", "not supported"),
]


@pytest.mark.parametrize("fields,param,fragment", REFUSED, ids=[r[1] + "-" + str(i) for i, r in enumerate(REFUSED)])
def test_unsupported_and_unknown_fields_are_refused_by_name(client, fields, param, fragment):
    body = {"model": "phiclip", "messages": SEA, "max_tokens": 2} | fields
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_fields_that_ask_for_the_default_are_accepted(client):
    for fields in ({"tools": []}, {"modalities": ["text"]}, {"store": False}, {"user": "ann"},
                   {"tools": None, "seed": None, "stop": None}, {"max_tokens": 3, "max_completion_tokens": 3}):
        ask(client, **{"max_tokens": 3} | fields)


# several images --------------------------------------------------------------------------------
def test_images_in_any_user_turn_reach_the_model_in_order(client, reference):
    a, b = png_bytes(1), png_bytes(2)
    messages = [
        image_message("What is this?", a),
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": [{"type": "text", "text": "And this one, compared with it?"},
                                     {"type": "image_url", "image_url": {"url": data_url(b)}}]},
    ]
    body = ask(client, messages, max_tokens=8)
    assert body["phiclip"]["route"] == "vision"
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]},
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": [{"type": "text", "text": "And this one, compared with it?"}, {"type": "image"}]},
    ]
    images = [Image.open(io.BytesIO(a)), Image.open(io.BytesIO(b))]
    assert texts(body) == [expected(reference, parts, images, max_new_tokens=8).text]
    swapped = expected(reference, parts, images[::-1], max_new_tokens=8).text
    assert texts(body) != [swapped]  # the order matters, and is kept
    prompt = reference.prompt_length(parts, 2)
    assert body["usage"]["prompt_tokens"] == prompt


# data URLs as clients send them ----------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "name,url",
    [
        ("no padding", lambda d: "data:image/png;base64," + _b64(d).rstrip("=")),
        ("MIME line breaks", lambda d: "data:image/png;base64," + base64.encodebytes(d).decode()),
        ("CRLF line breaks", lambda d: "data:image/png;base64," + "\r\n".join(
            _b64(d)[i : i + 76] for i in range(0, len(_b64(d)), 76))),
        ("URL-safe alphabet", lambda d: "data:image/png;base64," + base64.urlsafe_b64encode(d).decode()),
        ("mislabelled MIME type", lambda d: "data:image/jpeg;base64," + _b64(d)),
        ("no MIME type", lambda d: "data:;base64," + _b64(d)),
    ],
)
def test_data_urls_as_clients_send_them(client, name, url):
    data = png_bytes(3, size=41)  # 41 x 41 x 3 bytes: a length that needs padding
    assert len(_b64(data).rstrip("=")) % 4
    plain = ask(client, [image_message("Is it bright?", data)], max_tokens=6)
    message = {"role": "user", "content": [{"type": "text", "text": "Is it bright?"},
                                            {"type": "image_url", "image_url": {"url": url(data)}}]}
    assert texts(ask(client, [message], max_tokens=6)) == texts(plain)


@pytest.mark.parametrize("payload", ["@@@@", "AAAA", "not base64 at all!", "QUJD" * 3 + "="])
def test_garbage_data_urls_are_still_refused(client, payload):
    message = {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + payload}}]}
    response = client.post("/v1/chat/completions", json={"model": "phiclip", "messages": [message]})
    assert response.status_code in (400, 415), response.text
    assert response.json()["error"]["param"] == "messages[0].content[1].image_url.url"
