"""Hugging Face Spaces entry point: serve a vlmtune run (web UI at /ui, OpenAI-compatible API at /v1).

Which run:
  VLMTUNE_RUN           a run directory on this machine, or
  VLMTUNE_HUB_REPO      a Hub repository holding one (downloaded with snapshot_download);
                        VLMTUNE_HUB_SUBDIR (folder inside it), VLMTUNE_HUB_REVISION,
                        VLMTUNE_HUB_REPO_TYPE (model | dataset | space), HF_TOKEN for private repos
  otherwise ./run next to this file.

Settings (all optional): VLMTUNE_CONCURRENCY, VLMTUNE_WHISPER_MODEL ("bundled", a faster-whisper
name such as small.en, or "none"), VLMTUNE_LANGUAGE, VLMTUNE_MAX_UPLOAD_MB, VLMTUNE_MODEL_NAME.
It binds 0.0.0.0:7860 on Spaces (SPACE_ID is set there) and 127.0.0.1 elsewhere, unless
VLMTUNE_HOST / PORT say otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if (ROOT / "src" / "vlmtune").is_dir():  # the repository itself, not an installed package
    sys.path.insert(0, str(ROOT / "src"))


def resolve_run() -> Path:
    if os.environ.get("VLMTUNE_RUN"):
        return Path(os.environ["VLMTUNE_RUN"]).expanduser()
    repo = os.environ.get("VLMTUNE_HUB_REPO")
    if repo:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=repo,
            repo_type=os.environ.get("VLMTUNE_HUB_REPO_TYPE", "model"),
            revision=os.environ.get("VLMTUNE_HUB_REVISION") or None,
            token=os.environ.get("HF_TOKEN") or None,
        )
        return Path(folder) / os.environ.get("VLMTUNE_HUB_SUBDIR", "")
    return ROOT / "run"


def config_from_env():
    from vlmtune.serve.config import ServeConfig

    on_spaces = bool(os.environ.get("SPACE_ID"))
    whisper = os.environ.get("VLMTUNE_WHISPER_MODEL", "bundled")
    return ServeConfig(
        host=os.environ.get("VLMTUNE_HOST", "0.0.0.0" if on_spaces else "127.0.0.1"),
        port=int(os.environ.get("PORT", "7860")),
        concurrency=int(os.environ.get("VLMTUNE_CONCURRENCY", "1")),
        model_name=os.environ.get("VLMTUNE_MODEL_NAME", "vlmtune"),
        whisper_model=None if whisper.lower() in ("", "none", "off") else whisper,
        language=os.environ.get("VLMTUNE_LANGUAGE", "en"),
        max_upload_mb=float(os.environ.get("VLMTUNE_MAX_UPLOAD_MB", "20")),
    )


def main() -> int:
    import logging

    from vlmtune.serve.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = resolve_run()
    if not (run / "config.yaml").is_file():
        print(
            f"error: {run} is not a vlmtune run directory (no config.yaml). "
            "Set VLMTUNE_RUN to a run folder or VLMTUNE_HUB_REPO to a Hub repository holding one.",
            file=sys.stderr,
        )
        return 2
    serve(run, config_from_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
