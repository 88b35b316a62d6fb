"""The API key: 401s in OpenAI's shape, the right key, the web UI's login, the warning for open binds."""

from __future__ import annotations

import httpx
import pytest
from live_server import LiveServer
from tiny_models import build_tiny_run, tiny_backbones

from serve import server as server_module
from serve.auth import exposure_warning, is_loopback
from serve.cli import add_subparser, config_from_args
from serve.config import ServeConfig
from serve.server import build_app, load_engine

KEY = "team-secret-ü-42"
QUESTION = {"model": "phiclip", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, smol_tokenizer_dir):
    out = tmp_path_factory.mktemp("auth-run")
    lm, clip = tiny_backbones(out, smol_tokenizer_dir)
    config = ServeConfig(ui=True, whisper_model=None, api_key=KEY)
    engine = load_engine(build_tiny_run(out, lm, clip), config)
    with LiveServer(build_app(engine, None, config)) as live:
        yield live
    engine.close()


@pytest.fixture()
def client(keyed):
    with httpx.Client(base_url=keyed.url, timeout=60) as c:
        yield c


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}".encode()}


WRONG = [
    ("no header", {}, "needs an API key"),
    ("wrong key", bearer("team-secret"), "not valid"),
    ("key with a suffix", bearer(KEY + "x"), "not valid"),
    ("basic scheme", {"Authorization": "Basic dGVhbTpzZWNyZXQ="}, "Bearer <key>"),
    ("bearer without a key", {"Authorization": "Bearer"}, "Bearer <key>"),
]


@pytest.mark.parametrize("name,headers,fragment", WRONG, ids=[w[0] for w in WRONG])
@pytest.mark.parametrize(
    "method,path", [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/audio/transcriptions")]
)
def test_api_routes_answer_401_in_openai_shape_without_the_key(client, name, headers, fragment, method, path):
    response = client.request(method, path, headers=headers, json=QUESTION if method == "POST" else None)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert fragment in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"


def test_the_right_key_is_served(client):
    response = client.post("/v1/chat/completions", json=QUESTION, headers=bearer(KEY))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"
    assert client.get("/v1/models", headers=bearer(KEY)).json()["data"][0]["id"] == "phiclip"
    # a bad request with the right key gets its own error, not a 401
    bad = client.post("/v1/chat/completions", json={"model": "phiclip"}, headers=bearer(KEY))
    assert bad.status_code == 400 and "messages" in bad.json()["error"]["message"]


def test_health_is_open(client):
    assert client.get("/health").json()["status"] == "ok"


def test_web_ui_asks_for_the_key(client):
    # Without logging in, the page's config says a login is required and the event queue is shut.
    assert client.get("/ui/config").status_code == 401
    assert client.post("/ui/gradio_api/queue/join", json={}).status_code == 401
    # Gradio's login form: the password is the key, any user name; a wrong one is refused.
    assert client.post("/ui/login", data={"username": "ann", "password": "nope"}).status_code == 400
    assert client.get("/ui/config").status_code == 401
    login = client.post("/ui/login", data={"username": "ann", "password": KEY})
    assert login.status_code == 200 and login.json() == {"success": True}
    config = client.get("/ui/config")  # the client now carries Gradio's session cookie
    assert config.status_code == 200 and config.json()["components"]
    # the UI's cookie does not open the API
    assert client.get("/v1/models").status_code == 401


@pytest.mark.parametrize(
    "host,open_",
    [("127.0.0.1", False), ("127.0.0.2", False), ("::1", False), ("localhost", False),
     ("0.0.0.0", True), ("192.168.1.5", True), ("::", True), ("myhost.example", True)],
)
def test_binding_beyond_loopback_without_a_key_warns(host, open_):
    assert is_loopback(host) is not open_
    warning = exposure_warning(host, 7860, None)
    assert (warning is not None) is open_
    if open_:
        assert f"{host}:7860" in warning and "--api-key" in warning
    assert exposure_warning(host, 7860, "k") is None


def test_serve_prints_the_warning_naming_the_address(monkeypatch, capsys):
    class NoEngine:
        def close(self) -> None:
            pass

    ran = []
    monkeypatch.setattr(server_module, "load_engine", lambda run, config: NoEngine())
    monkeypatch.setattr(server_module, "load_transcriber", lambda config: None)
    monkeypatch.setattr(server_module, "build_app", lambda engine, transcriber, config: "app")
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: ran.append(kw["host"]))
    server_module.serve("run", ServeConfig(host="0.0.0.0", port=9123))
    assert "warning: serving on 0.0.0.0:9123 without an API key" in capsys.readouterr().err
    server_module.serve("run", ServeConfig(host="0.0.0.0", port=9123, api_key="k"))
    assert "warning" not in capsys.readouterr().err
    assert ran == ["0.0.0.0", "0.0.0.0"]


def test_key_from_the_option_or_the_environment(monkeypatch):
    import argparse

    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_subparser(parser.add_subparsers())
        return config_from_args(parser.parse_args(["serve", "r", *argv]))

    monkeypatch.delenv("PHICLIP_API_KEY", raising=False)
    assert parse().api_key is None
    monkeypatch.setenv("PHICLIP_API_KEY", "from-env")
    assert parse().api_key == "from-env"
    assert parse("--api-key", "from-flag").api_key == "from-flag"
