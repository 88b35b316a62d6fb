"""Where the offline models and data are kept once built."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where converted models, generated data and pretrained towers are kept (``PHICLIP_CACHE``)."""
    root = Path(os.environ.get("PHICLIP_CACHE", Path.home() / ".cache" / "phiclip"))
    root.mkdir(parents=True, exist_ok=True)
    return root
