"""Put the pieces together: load the run and Whisper, build the FastAPI app, mount the UI, run it."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from fastapi import FastAPI

from chat.assistant import VisionChat
from serve.api import create_app
from serve.auth import exposure_warning, key_matches
from serve.config import ServeConfig
from serve.engine import Engine
from serve.speech import Transcriber

log = logging.getLogger(__name__)

UI_PATH = "/ui"


def load_engine(run_dir: str | Path, config: ServeConfig) -> Engine:
    import torch

    device = torch.device(config.device) if config.device else None
    chats = []
    for i in range(config.concurrency):
        log.info("loading %s (copy %d of %d)", run_dir, i + 1, config.concurrency)
        chats.append(VisionChat.load(run_dir, device=device))
    return Engine(
        chats,
        max_queue=config.max_queue,
        model_name=config.model_name,
        max_batch=config.max_batch,
        batch_wait_ms=config.batch_wait_ms,
    )


def load_transcriber(config: ServeConfig) -> Transcriber | None:
    if not config.whisper_model:
        return None
    return Transcriber(
        config.whisper_model,
        language=config.language,
        device="cpu",  # tiny.en is fast on CPU and leaves the GPU to the model
        compute_type=config.whisper_compute_type,
        beam_size=config.whisper_beam_size,
        limits=config.limits,
    ).load()


def build_app(engine: Engine, transcriber: Transcriber | None, config: ServeConfig) -> FastAPI:
    """The API and, unless switched off, the web UI at ``/ui`` on one FastAPI app."""
    app = create_app(
        engine, transcriber, config.limits, ui_path=UI_PATH if config.ui else None, api_key=config.api_key
    )
    if config.ui:
        import gradio as gr

        from serve.ui import build_ui

        demo = build_ui(engine, transcriber, config.limits, max_images=config.max_images)
        demo.queue(max_size=config.max_queue)
        gr.mount_gradio_app(
            app,
            demo,
            path=UI_PATH,
            server_name=config.host,
            server_port=config.port,
            max_file_size=int(config.limits.max_upload_bytes),
            footer_links=[],
            run_history=False,
            ssr_mode=False,
            show_error=True,
            **_ui_login(config.api_key),
        )
        # A mounted app never "launches"; without this flag Gradio would accept any server path
        # in a file payload. With it, inputs must be files uploaded through this page.
        demo.has_launched = True
    return app


def _ui_login(api_key: str | None) -> dict:
    """Gradio's own login for the web UI: the password is the server's API key (any user name)."""
    if not api_key:
        return {}
    return {
        "auth": lambda username, password: key_matches(password, api_key),
        "auth_message": "This server asks for its API key: type it as the password (any user name).",
    }


def serve(run_dir: str | Path, config: ServeConfig) -> None:
    import uvicorn

    warning = exposure_warning(config.host, config.port, config.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    engine = load_engine(run_dir, config)
    transcriber = load_transcriber(config)
    app = build_app(engine, transcriber, config)
    where = f"http://{config.host}:{config.port}"
    print(
        f"Serving {run_dir} at {where}  (web UI {where}{UI_PATH}/, API {where}/v1, health {where}/health)", flush=True
    )
    try:
        uvicorn.run(app, host=config.host, port=config.port, log_level="info", timeout_keep_alive=30)
    finally:
        engine.close()
