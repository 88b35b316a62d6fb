"""Where a training run keeps its model: ``RUN/model/`` is a complete PhiClip folder (Hub-ready)."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = "model"


def model_dir(path: Path) -> Path:
    """The PhiClip folder of a run directory (its ``model/``), or ``path`` itself when it is one."""
    return path / MODEL_DIR if (path / MODEL_DIR / "config.json").is_file() else path
