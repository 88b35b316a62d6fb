"""Verify downloaded files (size, sha256) and remember verified ones in ``DIR/.prepare-state.json``."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from tqdm import tqdm

from prepare.common import CHUNK_SIZE, log, write_json_atomic
from prepare.sources import RemoteFile

STATE_FILE = ".prepare-state.json"


def sha256_file(path: Path, *, desc: str | None = None) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    total = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024,
        desc=desc or f"verify {path.name}", disable=None, leave=False,
    ) as bar:
        while True:
            chunk = f.read(CHUNK_SIZE)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
            bar.update(len(chunk))
    return size, h.hexdigest()


def verify(path: Path, size: int | None, sha256: str | None) -> tuple[str | None, int, str | None]:
    """Return (problem or None, actual size, sha256 or None if not computed)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, expected {size}", actual, None
    _, digest = sha256_file(path)
    if sha256 is not None and digest.lower() != sha256.lower():
        return f"sha256 {digest}, expected {sha256}", actual, digest
    return None, actual, digest


class State:
    """``DIR/.prepare-state.json``: files verified earlier, keyed by path relative to DIR."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / STATE_FILE
        self.files: dict[str, dict] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                self.files = dict(data.get("files", {}))
            except (OSError, ValueError, AttributeError) as e:
                log(f"ignoring unreadable {self.path} ({e}); files will be re-verified")

    def key(self, dest: Path) -> str:
        try:
            return dest.relative_to(self.out_dir).as_posix()
        except ValueError:
            return str(dest)

    def is_verified(self, remote: RemoteFile, dest: Path) -> bool:
        entry = self.files.get(self.key(dest))
        if not entry or not dest.is_file():
            return False
        actual = dest.stat().st_size
        if actual != entry.get("size"):
            log(f"{dest}: size changed since it was verified ({actual} != {entry.get('size')}); re-checking")
            self.forget(dest)
            return False
        if remote.size is not None and entry.get("size") != remote.size:
            return False
        if remote.sha256 is not None and str(entry.get("sha256", "")).lower() != remote.sha256.lower():
            return False
        return True

    def record(self, remote: RemoteFile, dest: Path, size: int, sha256: str | None) -> None:
        self.files[self.key(dest)] = {
            "url": remote.url,
            "size": size,
            "sha256": sha256,
            "verified_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.save()

    def forget(self, dest: Path) -> None:
        if self.files.pop(self.key(dest), None) is not None:
            self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, {"version": 1, "files": self.files})
