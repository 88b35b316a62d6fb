"""Dynamic batching: concurrent requests share generate() calls (one route per call), each answered and
streamed exactly as it would be alone; a client that leaves frees its row."""

from __future__ import annotations

import io
import threading
import time

import httpx
import pytest
from live_server import LiveServer
from PIL import Image
from test_serve_api import image_message, png_bytes, stream_chunks

from chat.assistant import GenerationSettings, VisionChat
from serve.config import ServeConfig
from serve.server import build_app, load_engine

WAIT_MS = 1500  # long enough that every request below reaches the server before its batch starts


@pytest.fixture(scope="module")
def reference(serve_run) -> VisionChat:
    return VisionChat.load(serve_run)


@pytest.fixture(scope="module")
def server(serve_run):
    config = ServeConfig(ui=False, whisper_model=None, max_batch=8, batch_wait_ms=WAIT_MS)
    engine = load_engine(serve_run, config)
    calls: list[dict] = []  # what each generate() call held
    chat = engine.chats[0]
    complete = chat.complete_prompts

    def recording(prompts, settings=None, *args, **kwargs):
        out = complete(prompts, settings, *args, **kwargs)
        calls.append({"routes": {bool(p.images) for p in prompts}, "rows": len(prompts), "completions": out})
        return out

    chat.complete_prompts = recording
    with LiveServer(build_app(engine, None, config)) as live:
        live.engine, live.calls = engine, calls
        yield live
    engine.close()


def together(server, bodies: list[dict], streamed: list[bool]) -> list[dict | list]:
    """Send the requests at once; the JSON answers (or the chunks of streamed ones), in order."""
    out: list = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            if streamed[i]:
                out[i] = stream_chunks(c, bodies[i]["messages"], **{k: v for k, v in bodies[i].items() if k != "messages"})
            else:
                response = c.post("/v1/chat/completions", json={"model": "phiclip", **bodies[i]})
                assert response.status_code == 200, response.text
                out[i] = response.json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def sea(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me about the sea, part {i}."}]


def test_concurrent_requests_share_calls_and_each_gets_its_own_answer(server, reference):
    image = png_bytes(4)
    bodies = [
        {"messages": sea(0), "max_tokens": 12},
        {"messages": sea(1), "max_tokens": 5},
        {"messages": sea(2), "max_tokens": 12, "temperature": 0.9, "seed": 3},
        {"messages": sea(3), "max_tokens": 12, "repetition_penalty": 1.4, "logprobs": True},
        {"messages": [image_message("Is it bright?", image)], "max_tokens": 10},
        {"messages": [image_message("What is it?", image)], "max_tokens": 10, "presence_penalty": 1.0},
        {"messages": [image_message("Describe it.", image)], "max_tokens": 10, "n": 2, "temperature": 1.0, "seed": 9},
    ]
    settings = [
        GenerationSettings(max_new_tokens=12),
        GenerationSettings(max_new_tokens=5),
        GenerationSettings(max_new_tokens=12, temperature=0.9, seed=3),
        GenerationSettings(max_new_tokens=12, repetition_penalty=1.4, logprobs=True),
        GenerationSettings(max_new_tokens=10),
        GenerationSettings(max_new_tokens=10, presence_penalty=1.0),
        GenerationSettings(max_new_tokens=10, temperature=1.0, seed=9),
    ]
    before = len(server.calls)
    streamed = [False, True, False, True, True, False, False]
    answers = together(server, bodies, streamed)
    calls = server.calls[before:]
    assert all(len(call["routes"]) == 1 for call in calls)  # image and text questions never share a call
    assert sorted(call["rows"] for call in calls) == [4, 4]  # 4 text rows; 3 image jobs with 4 rows

    picture = Image.open(io.BytesIO(image))
    for body, s, is_stream, answer in zip(bodies, settings, streamed, answers):
        messages = body["messages"]
        if isinstance(messages[0]["content"], list):
            text = messages[0]["content"][0]["text"]
            messages, images = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}], [picture]
        else:
            images = None
        n = body.get("n", 1)
        alone = [
            reference.complete([messages], [images], s if s.seed is None else GenerationSettings(**(vars(s) | {"seed": s.seed + i})))[0]
            for i in range(n)
        ]
        if is_stream:
            chunks, pieces = answer
            assert "".join(pieces) == alone[0].text
            assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == alone[0].finish_reason
        else:
            assert [c["message"]["content"] for c in answer["choices"]] == [a.text for a in alone]
            assert answer["usage"]["completion_tokens"] == sum(len(a.token_ids) for a in alone)
            if s.logprobs:
                got = [e["logprob"] for e in answer["choices"][0]["logprobs"]["content"]]
                assert got == pytest.approx([e.logprob for e in alone[0].logprobs], abs=1e-4)


def test_a_client_that_leaves_frees_its_row_and_the_batch_goes_on(server, reference):
    long = {"max_tokens": 200, "stream": True}
    left = threading.Event()

    def leave() -> None:
        body = {"model": "phiclip", "messages": sea(10), **long}
        with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            for _ in range(4):  # the role chunk and a few pieces, then hang up
                next(lines)
        left.set()

    health = httpx.get(f"{server.url}/health").json()
    before = len(server.calls)
    quitter = threading.Thread(target=leave)
    quitter.start()
    time.sleep(0.2)  # the quitter is first in the batch
    answers = together(server, [{"messages": sea(11), "max_tokens": 200}, {"messages": sea(12), "max_tokens": 200}],
                       [False, False])
    quitter.join(60)
    assert left.is_set()
    call = server.calls[before]
    assert call["rows"] == 3
    stopped = [c for c in call["completions"] if c.finish_reason == "cancelled"]
    assert len(stopped) == 1 and len(stopped[0].token_ids) < 200  # its row ended when its client left
    for i, answer in zip((11, 12), answers):
        alone = reference.complete([sea(i)], [None], GenerationSettings(max_new_tokens=200))[0]
        assert answer["choices"][0]["message"]["content"] == alone.text
        assert answer["usage"]["completion_tokens"] == len(alone.token_ids)
    after = httpx.get(f"{server.url}/health").json()
    assert after["cancelled"] == health["cancelled"] + 1 and after["served"] == health["served"] + 2
    assert after["running"] == after["waiting"] == 0
