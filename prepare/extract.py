"""Unpack a zip archive safely and resumably, and mark a finished extraction."""

from __future__ import annotations

import json
import os
import re
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from prepare.common import CHUNK_SIZE, PrepareError, check_free_space, log
from prepare.sources import RemoteFile


class BadArchiveError(PrepareError):
    """The archive cannot be read or a member is corrupt."""


def _safe_member_path(name: str) -> PurePosixPath | None:
    """Relative path for a zip member, or raise if it could escape the target."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise PrepareError(f"refusing zip member with an absolute path: {name!r}")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise PrepareError(f"refusing zip member that escapes the target folder: {name!r}")
    if not parts:
        return None
    return PurePosixPath(*parts)


def marker_path(archive_name: str, dest_dir: Path) -> Path:
    return dest_dir / f".{archive_name}.extracted"


def marker_valid(marker: Path, remote: RemoteFile) -> bool:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict) or data.get("archive") != remote.name:
        return False
    if remote.size is not None and data.get("size") != remote.size:
        return False
    if remote.sha256 is not None and str(data.get("sha256", "")).lower() != remote.sha256.lower():
        return False
    return True


def extract_zip(archive: Path, dest_dir: Path) -> int:
    """Extract ``archive`` into ``dest_dir`` (with progress); return the number of files.

    Every member is checked before anything is written: absolute paths and
    ``..`` components are refused. Files already present with the right size
    are kept, so an interrupted extraction continues where it stopped.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest_dir))
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise BadArchiveError(f"{archive}: not a readable zip file ({e}); delete it and rerun") from None
    with zf:
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in zf.infolist():
            rel = _safe_member_path(info.filename)
            if rel is None:
                continue
            target = root.joinpath(*rel.parts)
            parent_real = os.path.realpath(target.parent)
            if os.path.commonpath([str(root), parent_real]) != str(root):
                raise PrepareError(f"refusing zip member that escapes the target folder: {info.filename!r}")
            plan.append((info, target))

        todo = [
            (info, target) for info, target in plan
            if not info.is_dir() and not (target.is_file() and target.stat().st_size == info.file_size)
        ]
        todo_bytes = sum(info.file_size for info, _ in todo)
        check_free_space(dest_dir, todo_bytes, f"extracting {archive.name}")
        n_files = sum(1 for info, _ in plan if not info.is_dir())
        if len(todo) < n_files:
            log(f"{archive.name}: {n_files - len(todo)} of {n_files} files already extracted")

        with tqdm(
            total=todo_bytes, unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"extract {archive.name}", disable=None,
        ) as bar:
            for info, target in plan:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
            for info, target in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                try:
                    with zf.open(info) as src, open(tmp, "wb") as dst:
                        while True:
                            chunk = src.read(CHUNK_SIZE)
                            if not chunk:
                                break
                            dst.write(chunk)
                            bar.update(len(chunk))
                    os.replace(tmp, target)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    tmp.unlink(missing_ok=True)
                    raise BadArchiveError(
                        f"{archive}: member {info.filename!r} is corrupt ({e}); delete the archive and rerun"
                    ) from None
                except OSError as e:
                    tmp.unlink(missing_ok=True)
                    raise PrepareError(f"cannot write {target} while extracting {archive}: {e}") from None

    return n_files
