"""Hugging Face Spaces entry point: serve a phiclip run (web UI at /ui, OpenAI-compatible API at /v1).

Which run:
  PHICLIP_RUN           a run directory on this machine, or
  PHICLIP_HUB_REPO      a Hub repository holding one (downloaded with snapshot_download);
                        PHICLIP_HUB_SUBDIR (folder inside it), PHICLIP_HUB_REVISION,
                        PHICLIP_HUB_REPO_TYPE (model | dataset | space), HF_TOKEN for private repos
  otherwise ./run next to this file.

Settings (all optional): PHICLIP_CONCURRENCY, PHICLIP_WHISPER_MODEL ("bundled", a faster-whisper
name such as small.en, or "none"), PHICLIP_LANGUAGE, PHICLIP_MAX_UPLOAD_MB, PHICLIP_MODEL_NAME,
PHICLIP_API_KEY (a Space secret: the API and the web UI then ask for it).
It binds 0.0.0.0:7860 on Spaces (SPACE_ID is set there) and 127.0.0.1 elsewhere, unless
PHICLIP_HOST / PORT say otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if (ROOT / "modeling_phiclip.py").is_file():  # the repository itself, not an installed package
    sys.path.insert(0, str(ROOT))


def resolve_run() -> Path:
    if os.environ.get("PHICLIP_RUN"):
        return Path(os.environ["PHICLIP_RUN"]).expanduser()
    repo = os.environ.get("PHICLIP_HUB_REPO")
    if repo:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=repo,
            repo_type=os.environ.get("PHICLIP_HUB_REPO_TYPE", "model"),
            revision=os.environ.get("PHICLIP_HUB_REVISION") or None,
            token=os.environ.get("HF_TOKEN") or None,
        )
        return Path(folder) / os.environ.get("PHICLIP_HUB_SUBDIR", "")
    return ROOT / "run"


def config_from_env():
    from serve.config import ServeConfig

    on_spaces = bool(os.environ.get("SPACE_ID"))
    return ServeConfig(
        host=os.environ.get("PHICLIP_HOST", "0.0.0.0" if on_spaces else "127.0.0.1"),
        port=int(os.environ.get("PORT", "7860")),
        concurrency=int(os.environ.get("PHICLIP_CONCURRENCY", "1")),
        model_name=os.environ.get("PHICLIP_MODEL_NAME", "phiclip"),
        whisper_model=os.environ.get("PHICLIP_WHISPER_MODEL", "bundled"),
        language=os.environ.get("PHICLIP_LANGUAGE", "en"),
        max_upload_mb=float(os.environ.get("PHICLIP_MAX_UPLOAD_MB", "20")),
        api_key=os.environ.get("PHICLIP_API_KEY") or None,
    )


def main() -> int:
    import logging

    from serve.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = resolve_run()
    from chat.assistant import locate

    try:
        locate(run)
    except FileNotFoundError as err:
        print(f"error: {err}. Set PHICLIP_RUN to a run or PhiClip folder, or PHICLIP_HUB_REPO to a Hub repository.",
              file=sys.stderr)
        return 2
    serve(run, config_from_env())
    return 0


if __name__ == "__main__":
    sys.exit(main())
