"""What every step of ``phiclip prepare`` shares: its error, logging, sizes, disk space, atomic JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

CHUNK_SIZE = 1 << 20


class PrepareError(RuntimeError):
    """A download, verification, extraction or check failed (message names the URL/file)."""


def log(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def check_free_space(directory: Path, needed: int, what: str) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if needed > free:
        raise PrepareError(
            f"not enough free disk space in {directory} for {what}: "
            f"need {human_size(needed)}, have {human_size(free)}"
        )


def write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
