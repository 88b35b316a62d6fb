"""``phiclip serve RUN_DIR``: the web UI and the OpenAI-compatible API in one process.

The options are :class:`serve.config.ServeConfig`'s fields (help, defaults and bounds written there once).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from serve.config import API_KEY_ENV, ServeConfig, cli_fields, option_name


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
    p.add_argument("run_dir", help="a training run directory, a PhiClip folder or a Hub repo id")
    for f in cli_fields():
        if isinstance(f.default, bool):
            p.add_argument(option_name(f.name), dest=f.name, action="store_false", help=f.metadata["help"])
        else:
            kind = f.metadata["type"] or type(f.default)
            p.add_argument(option_name(f.name), dest=f.name, type=kind, default=f.default, help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The options as a :class:`ServeConfig` (the API key from ``$PHICLIP_API_KEY`` when not given).

    Raises ``ValueError`` naming the option that is out of bounds.
    """
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    values["api_key"] = values["api_key"] or os.environ.get(API_KEY_ENV) or None
    return ServeConfig(**values)


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
        config = config_from_args(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        serve(args.run_dir, config)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve")
    add_arguments(parser)
    return run(parser.parse_args(argv))
