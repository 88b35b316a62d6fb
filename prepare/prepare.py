"""Download LLaVA-Instruct conversations and COCO train2017 images.

``phiclip prepare llava-instruct --out DIR`` fetches the instruction-tuning
JSON from the Hugging Face Hub dataset ``liuhaotian/LLaVA-Instruct-150K``
(``llava_instruct_150k.json``, or ``llava_v1_5_mix665k.json`` with
``--mix665k``) and the COCO ``train2017.zip`` image archive, extracts the
archive and checks that every image the JSON refers to is on disk.

Layout of ``DIR``::

    DIR/
      llava_instruct_150k.json        the conversations (or llava_v1_5_mix665k.json)
      downloads/train2017.zip         the COCO archive (may be deleted after extraction)
      images/coco/train2017/*.jpg     extracted COCO images
      images/coco/.train2017.zip.extracted   marker: extraction finished
      .prepare-state.json             files already verified (size + sha256)

Image folder to train with (``PrepareSummary.images_dir``):

* 150k variant: ``DIR/images/coco/train2017`` -- the JSON names bare files
  such as ``000000033471.jpg``.
* 665k mix: ``DIR/images`` -- the JSON names ``coco/train2017/...``,
  ``gqa/images/...``, ``ocr_vqa/images/...``, ``textvqa/train_images/...`` and
  ``vg/VG_100K(_2)/...``. Only COCO is downloaded here; put the other image
  sets under ``DIR/images/`` yourself (the final check lists what is missing).

Downloads go to ``FILE.part`` and resume with an HTTP ``Range`` request; a
finished file is checked against its known size and sha256 (or the size the
server announced when none is pinned), and a file that fails the check is
deleted and fetched again a bounded number of times. Rerunning the command is
cheap: verified files are remembered in ``.prepare-state.json`` (only their
size is re-checked), and a finished extraction is remembered by its marker, so
the archive is neither re-downloaded nor re-extracted even if it was deleted.

Mirrors: ``--hub-url`` / ``$PHICLIP_HUB_URL`` (falls back to ``$HF_ENDPOINT``)
replaces ``https://huggingface.co``; ``--coco-url`` / ``$PHICLIP_COCO_URL``
replaces ``http://images.cocodataset.org/zips``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tqdm import tqdm

__all__ = [
    "RemoteFile",
    "PrepareSummary",
    "PrepareError",
    "BadArchiveError",
    "llava_instruct_sources",
    "fetch_file",
    "extract_zip",
    "check_images",
    "prepare_llava_instruct",
    "add_subparser",
]

# --------------------------------------------------------------------------
# Registry of sources
# --------------------------------------------------------------------------

DEFAULT_HUB_URL = "https://huggingface.co"
DEFAULT_COCO_URL = "http://images.cocodataset.org/zips"
HUB_REPO = "liuhaotian/LLaVA-Instruct-150K"
HUB_REVISION = "main"

VARIANTS: dict[str, str] = {
    "150k": "llava_instruct_150k.json",
    "mix665k": "llava_v1_5_mix665k.json",
}
_VARIANT_ALIASES = {"150k": "150k", "instruct150k": "150k", "mix665k": "mix665k", "665k": "mix665k"}

COCO_ARCHIVE = "train2017.zip"

# Known (size in bytes, sha256) of each file, None where not pinned. Only
# values cross-checked against several independent published records are
# pinned; everything else is verified against the size the server announces.
#  * train2017.zip: size and sha256 as published for the official COCO 2017
#    archive (the same digest appears in dataset builders and mirror manifests).
#  * llava_instruct_150k.json: size agreed on by independent records; no
#    sha256 pinned.
#  * llava_v1_5_mix665k.json: nothing pinned.
KNOWN_FILES: dict[str, tuple[int | None, str | None]] = {
    "llava_instruct_150k.json": (228_941_895, None),
    "llava_v1_5_mix665k.json": (None, None),
    COCO_ARCHIVE: (
        19_336_861_798,
        "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
    ),
}

DOWNLOADS_SUBDIR = "downloads"
IMAGES_SUBDIR = "images"
COCO_SUBDIR = "images/coco"  # train2017.zip holds train2017/<name>.jpg
STATE_FILE = ".prepare-state.json"

# Retry policy (module level so tests can shorten it).
MAX_ATTEMPTS = 3  # downloads that fail verification before giving up
MAX_NETWORK_RETRIES = 10  # interrupted/failed requests before giving up
RETRY_BACKOFF_S = 2.0  # first pause between network retries, doubles, capped
RETRY_BACKOFF_MAX_S = 60.0
HTTP_TIMEOUT_S = 60.0
CHUNK_SIZE = 1 << 20
MAX_MISSING_SHOWN = 20
USER_AGENT = "phiclip-prepare/0.1 (+python-urllib)"


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: local file ``name`` from ``url``.

    ``size``/``sha256`` are the expected values when known (None: not
    pinned). ``extract`` marks an archive to unpack after download.
    """

    name: str
    url: str
    size: int | None
    sha256: str | None
    extract: bool


@dataclass
class PrepareSummary:
    json_path: Path
    images_dir: Path
    n_records: int
    n_images_referenced: int
    missing: list[str] = field(default_factory=list)

    @property
    def n_missing(self) -> int:
        return len(self.missing)

    def report(self) -> str:
        lines = [
            f"conversations: {self.json_path} ({self.n_records} records)",
            f"images:        {self.images_dir}",
            f"referenced images: {self.n_images_referenced}, "
            f"present: {self.n_images_referenced - self.n_missing}, missing: {self.n_missing}",
        ]
        if self.missing:
            by_folder = Counter(m.split("/", 1)[0] if "/" in m else "." for m in self.missing)
            if len(by_folder) > 1 or "." not in by_folder:
                lines.append(
                    "missing by folder: "
                    + ", ".join(f"{k}: {v}" for k, v in by_folder.most_common())
                )
            lines.append(f"first {min(MAX_MISSING_SHOWN, self.n_missing)} missing:")
            lines += [f"  {m}" for m in self.missing[:MAX_MISSING_SHOWN]]
            if self.n_missing > MAX_MISSING_SHOWN:
                lines.append(f"  ... and {self.n_missing - MAX_MISSING_SHOWN} more")
        return "\n".join(lines)


class PrepareError(RuntimeError):
    """A download, verification, extraction or check failed (message names the URL/file)."""


class BadArchiveError(PrepareError):
    """The archive cannot be read or a member is corrupt."""


def _normalize_variant(variant: str) -> str:
    key = variant.lower().replace("-", "").replace("_", "")
    if key not in _VARIANT_ALIASES:
        raise ValueError(f"unknown LLaVA-Instruct variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return _VARIANT_ALIASES[key]


def _resolve_base(explicit: str | None, env_names: tuple[str, ...], default: str) -> str:
    if explicit:
        return explicit.rstrip("/")
    for name in env_names:
        value = os.environ.get(name)
        if value:
            return value.rstrip("/")
    return default


def hub_file_url(hub_url: str, filename: str, repo: str = HUB_REPO, revision: str = HUB_REVISION) -> str:
    return f"{hub_url.rstrip('/')}/datasets/{repo}/resolve/{revision}/{filename}"


def llava_instruct_sources(
    variant: str = "150k",
    *,
    hub_url: str | None = None,
    coco_url: str | None = None,
    skip_images: bool = False,
) -> list[RemoteFile]:
    """Files needed for ``variant`` ("150k" or "mix665k"), JSON first."""
    variant = _normalize_variant(variant)
    hub = _resolve_base(hub_url, ("PHICLIP_HUB_URL", "HF_ENDPOINT"), DEFAULT_HUB_URL)
    coco = _resolve_base(coco_url, ("PHICLIP_COCO_URL",), DEFAULT_COCO_URL)
    json_name = VARIANTS[variant]
    size, sha = KNOWN_FILES.get(json_name, (None, None))
    files = [RemoteFile(json_name, hub_file_url(hub, json_name), size, sha, extract=False)]
    if not skip_images:
        size, sha = KNOWN_FILES.get(COCO_ARCHIVE, (None, None))
        files.append(RemoteFile(COCO_ARCHIVE, f"{coco}/{COCO_ARCHIVE}", size, sha, extract=True))
    return files


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"prepare: {msg}", file=sys.stderr, flush=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _check_free_space(directory: Path, needed: int, what: str) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if needed > free:
        raise PrepareError(
            f"not enough free disk space in {directory} for {what}: "
            f"need {_human(needed)}, have {_human(free)}"
        )


def _write_json_atomic(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _sha256_file(path: Path, *, desc: str | None = None) -> tuple[int, str]:
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


def _verify(path: Path, size: int | None, sha256: str | None) -> tuple[str | None, int, str | None]:
    """Return (problem or None, actual size, sha256 or None if not computed)."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, expected {size}", actual, None
    _, digest = _sha256_file(path)
    if sha256 is not None and digest.lower() != sha256.lower():
        return f"sha256 {digest}, expected {sha256}", actual, digest
    return None, actual, digest


# --------------------------------------------------------------------------
# State of verified files
# --------------------------------------------------------------------------


class _State:
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
                _log(f"ignoring unreadable {self.path} ({e}); files will be re-verified")

    def _key(self, dest: Path) -> str:
        try:
            return dest.relative_to(self.out_dir).as_posix()
        except ValueError:
            return str(dest)

    def is_verified(self, remote: RemoteFile, dest: Path) -> bool:
        entry = self.files.get(self._key(dest))
        if not entry or not dest.is_file():
            return False
        actual = dest.stat().st_size
        if actual != entry.get("size"):
            _log(f"{dest}: size changed since it was verified ({actual} != {entry.get('size')}); re-checking")
            self.forget(dest)
            return False
        if remote.size is not None and entry.get("size") != remote.size:
            return False
        if remote.sha256 is not None and str(entry.get("sha256", "")).lower() != remote.sha256.lower():
            return False
        return True

    def record(self, remote: RemoteFile, dest: Path, size: int, sha256: str | None) -> None:
        self.files[self._key(dest)] = {
            "url": remote.url,
            "size": size,
            "sha256": sha256,
            "verified_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.save()

    def forget(self, dest: Path) -> None:
        if self.files.pop(self._key(dest), None) is not None:
            self.save()

    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(self.path, {"version": 1, "files": self.files})


# --------------------------------------------------------------------------
# Resumable download
# --------------------------------------------------------------------------


class _Interrupted(Exception):
    """Transient failure: the request can be retried/resumed."""


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", re.I)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes a-b/total`` -> (a, total); ``bytes */total`` -> (None, total)."""
    if not value:
        return None, None
    m = _CONTENT_RANGE.match(value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _int_header(headers, name: str) -> int | None:
    value = headers.get(name) if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _stream_to_part(url: str, part: Path, expected_size: int | None, label: str) -> int | None:
    """Bring ``part`` up to date from ``url``; return the file's total size if known.

    Resumes from the current size of ``part`` with a Range request. Raises
    ``_Interrupted`` for transient problems (the partial data stays), and
    ``PrepareError`` for permanent ones.
    """
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        _log(f"{part} is larger than the expected {expected_size} bytes; starting over")
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return expected_size  # complete already (e.g. interrupted before verification)

    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            _, total = _parse_content_range(e.headers.get("Content-Range") if e.headers else None)
            e.close()
            if total is not None and total == offset:
                return total  # the partial file is in fact complete
            _log(f"{url}: server refused to resume at byte {offset}; starting over")
            part.unlink()
            raise _Interrupted("range not satisfiable") from None
        e.close()
        if e.code >= 500 or e.code in (408, 425, 429):
            raise _Interrupted(f"HTTP {e.code} {e.reason}") from None
        raise PrepareError(f"HTTP {e.code} {e.reason} for {url}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _Interrupted(f"cannot connect: {reason}") from None

    with response:
        status = response.status
        length = _int_header(response.headers, "Content-Length")
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                _log(f"{url}: server resumed at byte {start}, not {offset}; starting over")
                part.unlink()
                raise _Interrupted("unexpected Content-Range")
            mode = "ab"
        elif status == 200:
            if offset:
                _log(f"{url}: server ignored the Range request (HTTP 200); downloading from the start")
            offset = 0
            total = length
            mode = "wb"
        else:
            raise PrepareError(f"unexpected HTTP {status} for {url}")

        if total is not None:
            _check_free_space(part.parent, total - offset, label)
        received = 0
        try:
            f = open(part, mode)
        except OSError as e:
            raise PrepareError(f"cannot write {part}: {e}") from None
        with f, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=label, disable=None,
        ) as bar:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except (http.client.HTTPException, OSError) as e:
                    raise _Interrupted(
                        f"connection lost after {offset + received} bytes: {e}"
                    ) from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise PrepareError(f"cannot write {part}: {e}") from None
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received < length:
            raise _Interrupted(
                f"connection closed after {offset + received} of {offset + length} bytes"
            )
    return total if total is not None else offset + received


def fetch_file(remote: RemoteFile, dest: Path, state: _State | None = None) -> Path:
    """Make sure ``dest`` holds a verified copy of ``remote``; return ``dest``.

    Skips the download when ``state`` says the file was verified before (its
    size is re-checked). An existing unrecorded file is verified in place when
    a size or sha256 is pinned, otherwise completed/confirmed via resume.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = _State(dest.parent)
    if state.is_verified(remote, dest):
        _log(f"{dest.name}: already downloaded and verified, skipping")
        return dest

    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if remote.size is not None or remote.sha256 is not None:
            _log(f"{dest}: checking the existing file")
            problem, size, digest = _verify(dest, remote.size, remote.sha256)
            if problem is None:
                state.record(remote, dest, size, digest)
                return dest
            _log(f"{dest}: existing file is corrupt ({problem}); deleting it and downloading again")
            dest.unlink()
        else:
            # Nothing to check it against locally: let the server confirm or complete it.
            os.replace(dest, part)

    failures = 0
    network_failures = 0
    label = remote.name
    while True:
        try:
            total = _stream_to_part(remote.url, part, remote.size, label)
        except _Interrupted as e:
            network_failures += 1
            if network_failures > MAX_NETWORK_RETRIES:
                raise PrepareError(
                    f"downloading {remote.url} failed after {network_failures} tries: {e} "
                    f"(partial data kept in {part}; rerun to resume)"
                ) from None
            pause = min(RETRY_BACKOFF_S * 2 ** (network_failures - 1), RETRY_BACKOFF_MAX_S)
            _log(f"{remote.url}: {e}; retrying in {pause:.0f}s ({network_failures}/{MAX_NETWORK_RETRIES})")
            time.sleep(pause)
            continue

        expected_size = remote.size if remote.size is not None else total
        problem, size, digest = _verify(part, expected_size, remote.sha256)
        if problem is None:
            os.replace(part, dest)
            state.record(remote, dest, size, digest)
            _log(f"{dest.name}: downloaded and verified ({_human(size)})")
            return dest
        failures += 1
        _log(f"{remote.url}: downloaded file is corrupt ({problem}); deleting it")
        part.unlink()
        if failures >= MAX_ATTEMPTS:
            raise PrepareError(
                f"{remote.url}: download did not verify after {failures} attempts "
                f"(last: {problem}); the server or a proxy may be serving a different file"
            )
        _log(f"{remote.url}: downloading again (attempt {failures + 1}/{MAX_ATTEMPTS})")


# --------------------------------------------------------------------------
# Zip extraction
# --------------------------------------------------------------------------


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


def _marker_path(archive_name: str, dest_dir: Path) -> Path:
    return dest_dir / f".{archive_name}.extracted"


def _marker_valid(marker: Path, remote: RemoteFile) -> bool:
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
        _check_free_space(dest_dir, todo_bytes, f"extracting {archive.name}")
        n_files = sum(1 for info, _ in plan if not info.is_dir())
        if len(todo) < n_files:
            _log(f"{archive.name}: {n_files - len(todo)} of {n_files} files already extracted")

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


# --------------------------------------------------------------------------
# Final check
# --------------------------------------------------------------------------

_COCO_NAME = re.compile(r"^(?:COCO_(?:train|val)2014_)?(\d{12})\.jpg$", re.I)


class _ImageIndex:
    """Lists each referenced folder once; resolves names, and COCO images by id.

    A reference ``000000033471.jpg`` is satisfied by
    ``COCO_train2014_000000033471.jpg`` in the same folder (and vice versa).
    """

    def __init__(self, root: Path):
        self.root = root
        self._dirs: dict[str, tuple[set[str], dict[int, str]]] = {}

    def _folder(self, rel_dir: str) -> tuple[set[str], dict[int, str]]:
        cached = self._dirs.get(rel_dir)
        if cached is None:
            names: set[str] = set()
            ids: dict[int, str] = {}
            try:
                with os.scandir(self.root / rel_dir if rel_dir else self.root) as it:
                    for entry in it:
                        if not entry.is_file():
                            continue
                        names.add(entry.name)
                        m = _COCO_NAME.match(entry.name)
                        if m:
                            ids.setdefault(int(m.group(1)), entry.name)
            except (FileNotFoundError, NotADirectoryError):
                pass
            cached = self._dirs[rel_dir] = (names, ids)
        return cached

    def exists(self, ref: str) -> bool:
        rel = ref.replace("\\", "/").lstrip("/")
        rel_dir, _, base = rel.rpartition("/")
        names, ids = self._folder(rel_dir)
        if base in names:
            return True
        m = _COCO_NAME.match(base)
        return bool(m) and int(m.group(1)) in ids


def check_images(json_path: Path, images_dir: Path) -> tuple[int, int, list[str]]:
    """Return (records, distinct images referenced, sorted missing references)."""
    try:
        with open(json_path, "rb") as f:
            records = json.load(f)
    except OSError as e:
        raise PrepareError(f"cannot read {json_path}: {e}") from None
    except ValueError as e:
        raise PrepareError(f"{json_path} is not valid JSON ({e}); delete it and rerun") from None
    if not isinstance(records, list):
        raise PrepareError(f"{json_path}: expected a JSON list of conversations, got {type(records).__name__}")

    referenced: set[str] = set()
    for record in records:
        if not isinstance(record, dict):
            continue
        image = record.get("image")
        if isinstance(image, str) and image:
            referenced.add(image)
        elif isinstance(image, list):
            referenced.update(x for x in image if isinstance(x, str) and x)

    index = _ImageIndex(images_dir)
    missing = sorted(ref for ref in referenced if not index.exists(ref))
    return len(records), len(referenced), missing


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------


def _warn_if_low_space(out_dir: Path, remote: RemoteFile, archive_path: Path) -> None:
    """Warn early when the archive plus its extracted contents will likely not fit."""
    if remote.size is None:
        return
    have = 0
    for p in (archive_path, archive_path.with_name(archive_path.name + ".part")):
        if p.is_file():
            have = max(have, p.stat().st_size)
    needed = (remote.size - have) + remote.size  # download + roughly the same again extracted
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        return
    if needed > free:
        _log(
            f"warning: {out_dir} has {_human(free)} free; downloading and extracting "
            f"{remote.name} needs about {_human(needed)}"
        )


def prepare_llava_instruct(
    out_dir: Path,
    *,
    variant: str = "150k",
    hub_url: str | None = None,
    coco_url: str | None = None,
    skip_images: bool = False,
) -> PrepareSummary:
    """Download (resumably) and verify the LLaVA-Instruct JSON and COCO train2017.

    ``hub_url``/``coco_url`` default to ``$PHICLIP_HUB_URL`` (or
    ``$HF_ENDPOINT``) / ``$PHICLIP_COCO_URL``, then to the official hosts.
    With ``skip_images`` the archive is not fetched; images already under
    ``out_dir/images`` are still checked. Prints the check's report and
    returns it; raises ``PrepareError`` on failure.
    """
    variant = _normalize_variant(variant)
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create output folder {out_dir}: {e}") from None
    state = _State(out_dir)
    coco_dir = out_dir / COCO_SUBDIR

    json_path: Path | None = None
    for remote in llava_instruct_sources(variant, hub_url=hub_url, coco_url=coco_url, skip_images=skip_images):
        if not remote.extract:
            json_path = fetch_file(remote, out_dir / remote.name, state)
            continue
        marker = _marker_path(remote.name, coco_dir)
        if _marker_valid(marker, remote):
            _log(f"{remote.name}: already extracted into {coco_dir}, skipping")
            continue
        archive_path = out_dir / DOWNLOADS_SUBDIR / remote.name
        _warn_if_low_space(out_dir, remote, archive_path)
        archive = fetch_file(remote, archive_path, state)
        _log(f"extracting {archive} into {coco_dir}")
        try:
            n = extract_zip(archive, coco_dir)
        except BadArchiveError:
            state.forget(archive)  # the next run verifies it again before trusting it
            raise
        entry = state.files.get(state._key(archive), {})
        _write_json_atomic(
            marker,
            {
                "archive": remote.name,
                "size": entry.get("size", archive.stat().st_size),
                "sha256": entry.get("sha256"),
                "files": n,
                "extracted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        _log(f"extracted {n} files; {archive} can be deleted to save space")

    assert json_path is not None
    images_dir = coco_dir / "train2017" if variant == "150k" else out_dir / IMAGES_SUBDIR
    n_records, n_refs, missing = check_images(json_path, images_dir)
    summary = PrepareSummary(
        json_path=json_path,
        images_dir=images_dir,
        n_records=n_records,
        n_images_referenced=n_refs,
        missing=missing,
    )
    print(summary.report(), flush=True)
    if missing and variant == "mix665k":
        print(
            "note: only COCO train2017 is downloaded here; the 665k mix also needs the GQA, "
            f"OCR-VQA, TextVQA and Visual Genome images under {images_dir}/",
            flush=True,
        )
    return summary


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    try:
        prepare_llava_instruct(
            Path(args.out),
            variant="mix665k" if args.mix665k else "150k",
            hub_url=args.hub_url,
            coco_url=args.coco_url,
            skip_images=args.skip_images,
        )
    except PrepareError as e:
        print(f"phiclip prepare: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"phiclip prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phiclip prepare: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def add_subparser(subparsers) -> None:
    """Register ``prepare llava-instruct`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "prepare",
        help="download training data (LLaVA-Instruct JSON + COCO train2017 images)",
        description=(
            "Download the LLaVA-Instruct-150K conversations (or the 665K mix) from the "
            "Hugging Face Hub and the COCO train2017 images, resumably, verify them and "
            "check that every referenced image is present. Rerun to resume or re-check."
        ),
    )
    p.add_argument("dataset", choices=["llava-instruct"], help="what to prepare")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--mix665k", action="store_true",
        help="use llava_v1_5_mix665k.json instead of llava_instruct_150k.json "
        "(non-COCO images of the mix are not downloaded)",
    )
    p.add_argument(
        "--skip-images", action="store_true",
        help="do not download/extract COCO train2017 (still checks images already present)",
    )
    p.add_argument(
        "--hub-url", default=None, metavar="URL",
        help=f"Hugging Face Hub endpoint or mirror (default: $PHICLIP_HUB_URL, $HF_ENDPOINT or {DEFAULT_HUB_URL})",
    )
    p.add_argument(
        "--coco-url", default=None, metavar="URL",
        help=f"base URL holding {COCO_ARCHIVE} (default: $PHICLIP_COCO_URL or {DEFAULT_COCO_URL})",
    )
    p.set_defaults(func=_run)
