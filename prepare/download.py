"""Resumable downloads: ``FILE.part`` continued with HTTP ``Range`` requests, retried, then verified."""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from prepare.common import CHUNK_SIZE, PrepareError, check_free_space, human_size, log
from prepare.sources import RemoteFile
from prepare.verify import State, verify

# Retry policy (module level so tests can shorten it).
MAX_ATTEMPTS = 3  # downloads that fail verification before giving up
MAX_NETWORK_RETRIES = 10  # interrupted/failed requests before giving up
RETRY_BACKOFF_S = 2.0  # first pause between network retries, doubles, capped
RETRY_BACKOFF_MAX_S = 60.0
HTTP_TIMEOUT_S = 60.0
USER_AGENT = "phiclip-prepare/0.1 (+python-urllib)"


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
        log(f"{part} is larger than the expected {expected_size} bytes; starting over")
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
            log(f"{url}: server refused to resume at byte {offset}; starting over")
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
                log(f"{url}: server resumed at byte {start}, not {offset}; starting over")
                part.unlink()
                raise _Interrupted("unexpected Content-Range")
            mode = "ab"
        elif status == 200:
            if offset:
                log(f"{url}: server ignored the Range request (HTTP 200); downloading from the start")
            offset = 0
            total = length
            mode = "wb"
        else:
            raise PrepareError(f"unexpected HTTP {status} for {url}")

        if total is not None:
            check_free_space(part.parent, total - offset, label)
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


def fetch_file(remote: RemoteFile, dest: Path, state: State | None = None) -> Path:
    """Make sure ``dest`` holds a verified copy of ``remote``; return ``dest``.

    Skips the download when ``state`` says the file was verified before (its
    size is re-checked). An existing unrecorded file is verified in place when
    a size or sha256 is pinned, otherwise completed/confirmed via resume.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = State(dest.parent)
    if state.is_verified(remote, dest):
        log(f"{dest.name}: already downloaded and verified, skipping")
        return dest

    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        if remote.size is not None or remote.sha256 is not None:
            log(f"{dest}: checking the existing file")
            problem, size, digest = verify(dest, remote.size, remote.sha256)
            if problem is None:
                state.record(remote, dest, size, digest)
                return dest
            log(f"{dest}: existing file is corrupt ({problem}); deleting it and downloading again")
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
            log(f"{remote.url}: {e}; retrying in {pause:.0f}s ({network_failures}/{MAX_NETWORK_RETRIES})")
            time.sleep(pause)
            continue

        expected_size = remote.size if remote.size is not None else total
        problem, size, digest = verify(part, expected_size, remote.sha256)
        if problem is None:
            os.replace(part, dest)
            state.record(remote, dest, size, digest)
            log(f"{dest.name}: downloaded and verified ({human_size(size)})")
            return dest
        failures += 1
        log(f"{remote.url}: downloaded file is corrupt ({problem}); deleting it")
        part.unlink()
        if failures >= MAX_ATTEMPTS:
            raise PrepareError(
                f"{remote.url}: download did not verify after {failures} attempts "
                f"(last: {problem}); the server or a proxy may be serving a different file"
            )
        log(f"{remote.url}: downloading again (attempt {failures + 1}/{MAX_ATTEMPTS})")
