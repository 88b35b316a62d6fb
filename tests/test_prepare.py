"""Tests for ``phiclip prepare llava-instruct`` against a local HTTP server (no internet)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from prepare import check, cli, download, extract, sources
from prepare.common import PrepareError
from prepare.llava_instruct import prepare_llava_instruct

JSON_NAME = "llava_instruct_150k.json"
MIX_NAME = "llava_v1_5_mix665k.json"
HUB_PREFIX = "/hub"
COCO_PREFIX = "/coco"
JSON_PATH = f"{HUB_PREFIX}/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/{JSON_NAME}"
MIX_PATH = f"{HUB_PREFIX}/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/{MIX_NAME}"
ZIP_PATH = f"{COCO_PREFIX}/train2017.zip"


# --------------------------------------------------------------------------
# A small file server with Range support and fault injection
# --------------------------------------------------------------------------


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.once: dict[str, list[bytes]] = {}  # bodies served (in order) before files[path]
        self.always: dict[str, bytes] = {}  # overrides files[path] for every request
        self.cut_once: set[str] = set()  # paths whose next body is cut in half
        self.redirects: dict[str, str] = {}  # path -> path answered with a 302
        self.honor_range = True
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                owner._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def requests_for(self, path: str) -> list[str | None]:
        return [rng for p, rng in self.requests if p == path]

    def _body(self, path: str) -> bytes | None:
        with self.lock:
            if self.once.get(path):
                return self.once[path].pop(0)
            if path in self.always:
                return self.always[path]
            return self.files.get(path)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urllib.parse.urlsplit(h.path).path
        rng = h.headers.get("Range")
        with self.lock:
            self.requests.append((path, rng))
        if path in self.redirects:
            h.send_response(302)
            h.send_header("Location", self.url + self.redirects[path])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = self._body(path)
        if body is None:
            h.send_error(404, "Not Found")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and self.honor_range:
            start = int(m.group(1))
            if start >= len(body):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(body)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        payload = body[start:]
        h.send_header("Content-Length", str(len(payload)))
        h.send_header("Content-Type", "application/octet-stream")
        h.end_headers()
        with self.lock:
            cut = path in self.cut_once
            self.cut_once.discard(path)
        if cut:
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(payload)


@pytest.fixture
def server():
    srv = FileServer()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


# --------------------------------------------------------------------------
# Fixture data
# --------------------------------------------------------------------------


def _jpeg(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _conv(i: int, image: str | None) -> dict:
    rec = {
        "id": f"{i:012d}",
        "conversations": [
            {"from": "human", "value": ("<image>\n" if image else "") + f"Question {i}?"},
            {"from": "gpt", "value": f"Answer {i}."},
        ],
    }
    if image is not None:
        rec["image"] = image
    return rec


def _zip_bytes(members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def data(server, monkeypatch):
    """Serve a tiny LLaVA JSON (3 images + 1 text-only record) and a COCO-like zip.

    The zip holds 2 of the 3 referenced images plus one unreferenced image, so
    ``000000000003.jpg`` is missing.
    """
    records = [
        _conv(1, "000000000001.jpg"),
        _conv(2, "000000000002.jpg"),
        _conv(3, "000000000003.jpg"),
        _conv(4, None),
        _conv(5, "000000000001.jpg"),  # same image twice
    ]
    json_bytes = json.dumps(records).encode()
    zip_bytes = _zip_bytes(
        {
            "train2017/000000000001.jpg": _jpeg((255, 0, 0)),
            "train2017/000000000002.jpg": _jpeg((0, 255, 0)),
            "train2017/000000000099.jpg": _jpeg((0, 0, 255)),
        },
        dirs=("train2017/",),
    )
    server.files[JSON_PATH] = json_bytes
    server.files[ZIP_PATH] = zip_bytes
    monkeypatch.setitem(sources.KNOWN_FILES, JSON_NAME, (len(json_bytes), _sha(json_bytes)))
    monkeypatch.setitem(sources.KNOWN_FILES, "train2017.zip", (len(zip_bytes), _sha(zip_bytes)))
    monkeypatch.setattr(download, "RETRY_BACKOFF_S", 0.0)
    for var in ("PHICLIP_HUB_URL", "PHICLIP_COCO_URL", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return {"json": json_bytes, "zip": zip_bytes, "records": records}


def _run(server, out: Path, **kw) -> check.PrepareSummary:
    return prepare_llava_instruct(
        out, hub_url=server.url + HUB_PREFIX, coco_url=server.url + COCO_PREFIX, **kw
    )


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_registry_real_urls(monkeypatch):
    for var in ("PHICLIP_HUB_URL", "PHICLIP_COCO_URL", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    js, coco = sources.llava_instruct_sources("150k")
    assert js.url == (
        "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_instruct_150k.json"
    )
    assert not js.extract
    assert coco.url == "http://images.cocodataset.org/zips/train2017.zip"
    assert coco.size == 19336861798 and coco.extract
    (mix,) = sources.llava_instruct_sources("mix665k", skip_images=True)
    assert mix.url.endswith("/resolve/main/llava_v1_5_mix665k.json")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    monkeypatch.setenv("PHICLIP_COCO_URL", "https://coco.example/zips")
    js, coco = sources.llava_instruct_sources("150k")
    assert js.url.startswith("https://mirror.example/datasets/")
    assert coco.url == "https://coco.example/zips/train2017.zip"
    with pytest.raises(ValueError):
        sources.llava_instruct_sources("300k")


def test_full_prepare_reports_missing(server, data, tmp_path, capsys):
    out = tmp_path / "out"
    summary = _run(server, out)

    assert summary.json_path == out / JSON_NAME
    assert summary.json_path.read_bytes() == data["json"]
    assert summary.images_dir == out / "images" / "coco" / "train2017"
    assert (summary.images_dir / "000000000001.jpg").is_file()
    assert (summary.images_dir / "000000000099.jpg").is_file()
    assert summary.n_records == 5
    assert summary.n_images_referenced == 3
    assert summary.missing == ["000000000003.jpg"]
    printed = capsys.readouterr().out
    assert "missing: 1" in printed
    assert "000000000003.jpg" in printed

    state = json.loads((out / ".prepare-state.json").read_text())["files"]
    assert state[JSON_NAME]["sha256"] == _sha(data["json"])
    assert state["downloads/train2017.zip"]["size"] == len(data["zip"])
    assert (out / "images" / "coco" / ".train2017.zip.extracted").is_file()
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))


def test_rerun_skips_without_requests(server, data, tmp_path):
    out = tmp_path / "out"
    first = _run(server, out)
    server.requests.clear()

    second = _run(server, out)
    assert server.requests == []
    assert second == first

    # The archive may be deleted after extraction: the marker still avoids a download.
    (out / "downloads" / "train2017.zip").unlink()
    assert _run(server, out).missing == ["000000000003.jpg"]
    assert server.requests == []


def test_rerun_rechecks_size_of_verified_file(server, data, tmp_path):
    out = tmp_path / "out"
    _run(server, out, skip_images=True)
    server.requests.clear()
    with open(out / JSON_NAME, "ab") as f:
        f.write(b"garbage")
    summary = _run(server, out, skip_images=True)
    assert summary.json_path.read_bytes() == data["json"]
    assert server.requests_for(JSON_PATH) == [None]


def test_resume_from_partial_file_uses_range(server, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    half = len(data["json"]) // 2
    (out / (JSON_NAME + ".part")).write_bytes(data["json"][:half])

    summary = _run(server, out, skip_images=True)
    assert server.requests_for(JSON_PATH) == [f"bytes={half}-"]
    assert summary.json_path.read_bytes() == data["json"]
    assert not (out / (JSON_NAME + ".part")).exists()


def test_resume_after_connection_cut(server, data, tmp_path, capsys):
    server.cut_once.add(ZIP_PATH)
    out = tmp_path / "out"
    summary = _run(server, out)

    ranges = server.requests_for(ZIP_PATH)
    assert ranges == [None, f"bytes={len(data['zip']) // 2}-"]
    assert (out / "downloads" / "train2017.zip").read_bytes() == data["zip"]
    assert summary.missing == ["000000000003.jpg"]
    assert "connection closed" in capsys.readouterr().err


def test_server_answering_200_to_range_restarts(server, data, tmp_path, capsys):
    server.honor_range = False
    out = tmp_path / "out"
    out.mkdir()
    # A stale partial file whose bytes don't even match: must be overwritten, not appended to.
    (out / (JSON_NAME + ".part")).write_bytes(b"X" * 40)

    summary = _run(server, out, skip_images=True)
    assert server.requests_for(JSON_PATH) == ["bytes=40-"]
    assert summary.json_path.read_bytes() == data["json"]
    assert "ignored the Range request" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["flipped-byte", "truncated", "extended"])
def test_corrupt_download_is_deleted_and_fetched_again(server, data, tmp_path, capsys, kind):
    good = data["json"]
    bad = {
        "flipped-byte": good[:10] + bytes([good[10] ^ 0xFF]) + good[11:],
        "truncated": good[:-5],
        "extended": good + b"\n\n",
    }[kind]
    server.once[JSON_PATH] = [bad]
    out = tmp_path / "out"
    summary = _run(server, out, skip_images=True)

    assert summary.json_path.read_bytes() == good
    assert len(server.requests_for(JSON_PATH)) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and ("sha256" in err or "size" in err)


def test_corrupt_existing_file_is_detected(server, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    good = data["json"]
    (out / JSON_NAME).write_bytes(bytes(len(good)))  # right size, wrong content, no state
    summary = _run(server, out, skip_images=True)
    assert summary.json_path.read_bytes() == good
    assert server.requests_for(JSON_PATH) == [None]
    assert "existing file is corrupt" in capsys.readouterr().err


def test_existing_good_file_is_adopted_without_download(server, data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / JSON_NAME).write_bytes(data["json"])
    _run(server, out, skip_images=True)
    assert server.requests_for(JSON_PATH) == []


def test_persistent_corruption_gives_clear_error(server, data, tmp_path):
    server.always[JSON_PATH] = b"not the right bytes" + bytes(len(data["json"]))
    out = tmp_path / "out"
    with pytest.raises(PrepareError) as exc:
        _run(server, out, skip_images=True)
    msg = str(exc.value)
    assert JSON_PATH in msg and "did not verify" in msg
    assert len(server.requests_for(JSON_PATH)) == download.MAX_ATTEMPTS
    assert not (out / JSON_NAME).exists() and not (out / (JSON_NAME + ".part")).exists()


def test_unpinned_file_verified_by_server_size_and_416(server, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sources.KNOWN_FILES, JSON_NAME, (None, None))
    out = tmp_path / "out"
    out.mkdir()
    # Complete data left as .part (interrupted before the rename): server answers 416.
    (out / (JSON_NAME + ".part")).write_bytes(data["json"])
    summary = _run(server, out, skip_images=True)
    assert summary.json_path.read_bytes() == data["json"]
    assert server.requests_for(JSON_PATH) == [f"bytes={len(data['json'])}-"]

    # A cut connection is caught through Content-Length even without a pinned size.
    server.requests.clear()
    (out / JSON_NAME).unlink()
    (out / ".prepare-state.json").unlink()
    server.cut_once.add(JSON_PATH)
    summary = _run(server, out, skip_images=True)
    assert summary.json_path.read_bytes() == data["json"]
    assert len(server.requests_for(JSON_PATH)) == 2


def test_http_404_is_a_clear_error(server, data, tmp_path):
    del server.files[ZIP_PATH]
    with pytest.raises(PrepareError, match=r"HTTP 404 .*train2017\.zip"):
        _run(server, tmp_path / "out")
    assert len(server.requests_for(ZIP_PATH)) == 1  # 4xx is not retried


def test_network_retries_are_bounded(data, tmp_path, monkeypatch):
    monkeypatch.setattr(download, "MAX_NETWORK_RETRIES", 2)
    # Nothing listens on this port (bound and closed immediately).
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(PrepareError, match=rf"127\.0\.0\.1:{port}.*failed after 3 tries"):
        prepare_llava_instruct(tmp_path / "out", hub_url=f"http://127.0.0.1:{port}", skip_images=True)


@pytest.mark.parametrize(
    "evil", ["../evil.jpg", "train2017/../../evil.jpg", "/tmp/evil-abs.jpg", "..\\evil.jpg", "C:/evil.jpg"]
)
def test_zip_path_traversal_is_refused(tmp_path, evil):
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_bytes({"train2017/ok.jpg": b"ok", evil: b"evil"}))
    dest = tmp_path / "a" / "b"
    with pytest.raises(PrepareError, match="refusing zip member"):
        extract.extract_zip(archive, dest)
    # Nothing was written at all: members are checked before extraction starts.
    assert not (dest / "train2017" / "ok.jpg").exists()
    assert not list(tmp_path.rglob("evil*"))


def test_zip_traversal_through_prepare_is_refused(server, data, tmp_path, monkeypatch):
    bad = _zip_bytes({"train2017/000000000001.jpg": b"x", "../../escape.jpg": b"x"})
    server.files[ZIP_PATH] = bad
    monkeypatch.setitem(sources.KNOWN_FILES, "train2017.zip", (len(bad), _sha(bad)))
    with pytest.raises(PrepareError, match=r"refusing zip member.*escape\.jpg"):
        _run(server, tmp_path / "out")
    assert not list(tmp_path.rglob("escape.jpg"))
    assert not (tmp_path / "out" / "images" / "coco" / ".train2017.zip.extracted").exists()


def test_bad_zip_is_a_clear_error(tmp_path):
    archive = tmp_path / "train2017.zip"
    archive.write_bytes(b"this is not a zip")
    with pytest.raises(extract.BadArchiveError, match="train2017.zip"):
        extract.extract_zip(archive, tmp_path / "x")


def test_extraction_continues_after_interruption(tmp_path):
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"d/1.jpg": b"one", "d/2.jpg": b"two"}))
    dest = tmp_path / "x"
    (dest / "d").mkdir(parents=True)
    (dest / "d" / "1.jpg").write_bytes(b"one")  # already extracted
    (dest / "d" / "2.jpg").write_bytes(b"t")  # partially written
    assert extract.extract_zip(archive, dest) == 2
    assert (dest / "d" / "2.jpg").read_bytes() == b"two"


def test_coco_2014_names_resolve_by_id(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "000000000001.jpg").write_bytes(b"a")
    (images / "COCO_train2014_000000033471.jpg").write_bytes(b"b")
    (images / "COCO_val2014_000000000007.jpg").write_bytes(b"c")
    js = tmp_path / "d.json"
    js.write_text(
        json.dumps(
            [
                _conv(1, "000000000001.jpg"),
                _conv(2, "000000033471.jpg"),
                _conv(3, "000000000007.jpg"),
                _conv(4, "000000000005.jpg"),
                _conv(5, None),
            ]
        )
    )
    summary = check.check_images(js, images)
    assert (summary.n_records, summary.n_images_referenced, summary.missing) == (5, 4, ["000000000005.jpg"])


def test_check_finds_exactly_what_training_reads(tmp_path):
    from data.images import ImageResolver
    from data.sources import read_records
    from processing_phiclip import ImageError

    images = tmp_path / "images"
    (images / "train2017").mkdir(parents=True)
    (images / "train2017" / "000000000009.jpg").write_bytes(b"a")  # training also looks in train2017/
    (images / "000000000004.JPG").write_bytes(b"b")  # training's COCO names are lower-case .jpg
    (tmp_path / "outside.jpg").write_bytes(b"c")  # on disk, but outside the images folder
    unusable = {**_conv(7, "000000000007.jpg"), "conversations": []}  # training skips it, image and all
    js = tmp_path / "d.json"
    js.write_text(json.dumps([_conv(1, "000000000009.jpg"), _conv(2, "000000000004.jpg"), _conv(3, "../outside.jpg"),
                              unusable, _conv(5, None)]))
    summary = check.check_images(js, images)
    assert summary.missing == ["../outside.jpg", "000000000004.jpg"]
    assert (summary.n_records, summary.n_images_referenced, summary.n_unusable) == (5, 3, 1)
    assert "records training will skip: 1" in summary.report()

    resolver = ImageResolver(images)
    for record in read_records(js)[0]:
        for name in record.images:
            try:
                resolver.resolve(name)
                found = True
            except ImageError:
                found = False
            assert found == (name not in summary.missing), name


def test_missing_report_lists_first_20(tmp_path):
    js = tmp_path / "d.json"
    js.write_text(json.dumps([_conv(i, f"{i:012d}.jpg") for i in range(30)]))
    (tmp_path / "images").mkdir()
    report = check.check_images(js, tmp_path / "images").report()
    assert "missing: 30" in report
    assert "000000000019.jpg" in report and "000000000020.jpg" not in report
    assert "and 10 more" in report


def test_invalid_json_is_a_clear_error(tmp_path):
    js = tmp_path / "broken.json"
    js.write_text("[{")
    with pytest.raises(PrepareError, match="broken.json"):
        check.check_images(js, tmp_path)


def test_mix665k_variant(server, data, tmp_path, monkeypatch, capsys):
    records = [
        _conv(1, "coco/train2017/000000000001.jpg"),
        _conv(2, "gqa/images/2354786.jpg"),
        _conv(3, None),
    ]
    body = json.dumps(records).encode()
    server.files[MIX_PATH] = body
    monkeypatch.setitem(sources.KNOWN_FILES, MIX_NAME, (None, None))
    out = tmp_path / "out"
    summary = _run(server, out, variant="mix665k")
    assert summary.json_path == out / MIX_NAME
    assert summary.images_dir == out / "images"
    assert summary.n_records == 3 and summary.n_images_referenced == 2
    assert summary.missing == ["gqa/images/2354786.jpg"]
    printed = capsys.readouterr().out
    assert "gqa: 1" in printed and "Visual Genome" in printed


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="phiclip")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_subparser(sub)
    return parser.parse_args(argv)


def test_cli_through_add_subparser(server, data, tmp_path, capsys):
    out = tmp_path / "cli-out"
    args = _cli(
        [
            "prepare", "llava-instruct", "--out", str(out),
            "--hub-url", server.url + HUB_PREFIX, "--coco-url", server.url + COCO_PREFIX,
        ]
    )
    assert args.out == out and not args.mix665k and not args.skip_images
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "missing: 1" in printed and "000000000003.jpg" in printed
    assert (out / "images" / "coco" / "train2017" / "000000000002.jpg").is_file()


def test_phiclip_prepare_command(server, data, tmp_path, capsys):
    from phiclip_cli import main

    out = tmp_path / "o"
    assert main(["prepare", "llava-instruct", "--out", str(out), "--skip-images",
                 "--hub-url", server.url + HUB_PREFIX]) == 0
    assert (out / JSON_NAME).read_bytes() == data["json"]
    assert "referenced images: 3" in capsys.readouterr().out


def test_prepare_also_writes_a_parquet_dataset(server, data, tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from data.check import check_dataset
    from data.sources import read_records
    from phiclip_cli import main

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    out = tmp_path / "o"
    assert main(["prepare", "llava-instruct", "--out", str(out), "--parquet",
                 "--hub-url", server.url + HUB_PREFIX, "--coco-url", server.url + COCO_PREFIX]) == 0
    printed = capsys.readouterr().out
    assert "5 records read, 4 kept, 1 skipped" in printed and "missing image: 000000000003.jpg" in printed
    records, report = read_records(out / "parquet")
    assert [r.id for r in records] == [f"{i:012d}" for i in (1, 2, 4, 5)] and not report.problems
    assert [r.images[0].read() for r in records if r.images] == [_jpeg((255, 0, 0)), _jpeg((0, 255, 0)),
                                                                 _jpeg((255, 0, 0))]
    assert check_dataset(out / "parquet").n_kept == 4


def test_cli_env_urls_and_skip_images(server, data, tmp_path, monkeypatch):
    monkeypatch.setenv("PHICLIP_HUB_URL", server.url + HUB_PREFIX)
    args = _cli(["prepare", "llava-instruct", "--out", str(tmp_path / "o"), "--skip-images"])
    assert args.func(args) == 0
    assert server.requests_for(ZIP_PATH) == []
    assert server.requests_for(JSON_PATH) == [None]


def test_cli_error_exit_code_names_url(server, data, tmp_path, capsys):
    del server.files[JSON_PATH]
    args = _cli(
        ["prepare", "llava-instruct", "--out", str(tmp_path / "o"), "--hub-url", server.url + HUB_PREFIX]
    )
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert "error: HTTP 404" in err and JSON_NAME in err


def test_cli_rejects_unknown_dataset():
    with pytest.raises(SystemExit):
        _cli(["prepare", "imagenet", "--out", "x"])
    with pytest.raises(SystemExit):
        _cli(["prepare", "llava-instruct"])  # --out is required


def test_resume_through_redirect_keeps_range(server, data, tmp_path):
    # The Hub answers /resolve/ with a redirect to a CDN; the Range header must survive it.
    server.files["/cdn/blob"] = data["json"]
    server.redirects[JSON_PATH] = "/cdn/blob"
    out = tmp_path / "out"
    out.mkdir()
    (out / (JSON_NAME + ".part")).write_bytes(data["json"][:7])
    summary = _run(server, out, skip_images=True)
    assert summary.json_path.read_bytes() == data["json"]
    assert server.requests_for(JSON_PATH) == ["bytes=7-"]
    assert server.requests_for("/cdn/blob") == ["bytes=7-"]


def test_not_enough_disk_space_is_a_clear_error(server, data, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6, 10))
    with pytest.raises(PrepareError, match="not enough free disk space"):
        _run(server, tmp_path / "out", skip_images=True)
