"""Hugging Face datasets as training, check, stats and eval data: parquet, arrow, ``save_to_disk`` folders and
Hub ids (through the local test Hub), TRL's and LLaVA's layouts, streamed or not.

Every dataset here is built by the test with the ``datasets`` library from the same LLaVA JSON + image files
that the JSON tests use, so the two roads can be compared record by record and loss by loss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import make_toy_data, tiny_config, write_image

datasets = pytest.importorskip("datasets")
from datasets import Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402

from data.check import check_dataset  # noqa: E402
from data.hf_records import parse_source  # noqa: E402
from data.images import RowImage  # noqa: E402
from data.sources import read_records  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """The ``datasets`` Arrow cache of this test, in its own folder (also for the processes it starts)."""
    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


# ---- building datasets from LLaVA JSON records -----------------------------------------------------------------


def _image(images: Path, name: str) -> dict:
    return {"bytes": (images / name).read_bytes(), "path": name}


def _names(record: dict) -> list[str]:
    value = record.get("images", record.get("image"))
    return [] if value is None else value if isinstance(value, list) else [value]


def llava_layout(records: list[dict], images: Path, with_id: bool = True) -> Dataset:
    """LLaVA's layout in columns, every image embedded (``images``: a list of ``datasets.Image``)."""
    rows = []
    for record in records:
        row = {k: v for k, v in record.items() if k not in ("image", "images") and (with_id or k != "id")}
        row["images"] = [_image(images, n) for n in _names(record)]
        rows.append(row)
    columns = dict.fromkeys(k for row in rows for k in row)
    return Dataset.from_dict({k: [row.get(k) for row in rows] for k in columns}).cast_column("images", List(Image()))


def _parts(value: str) -> list[dict]:
    """A LLaVA user turn as content parts: each ``<image>`` an image part, the text between as text parts."""
    parts = []
    for piece in re.split(r"(<image>)", value):
        if piece == "<image>":
            parts.append({"type": "image", "text": None})
        elif piece.strip("\n"):
            parts.append({"type": "text", "text": piece.strip("\n")})
    return parts


def trl_layout(records: list[dict], images: Path) -> Dataset:
    """TRL's conversational layout (``messages`` with content parts, ``images``), without an ``id`` column."""
    roles = {"human": "user", "gpt": "assistant"}
    rows = [{"messages": [{"role": roles[t["from"]], "content": _parts(t["value"])} for t in record["conversations"]],
             "images": [_image(images, n) for n in _names(record)]} for record in records]
    return Dataset.from_list(rows).cast_column("images", List(Image()))


def write_source(ds: Dataset, root: Path, kind: str) -> Path:
    """``ds`` saved as one of the local source kinds; returns what ``data.train`` names."""
    if kind == "parquet":
        ds.to_parquet(str(root / "d.parquet"))
        return root / "d.parquet"
    if kind == "parquet-folder":
        (root / "pq" / "data").mkdir(parents=True)
        ds.to_parquet(str(root / "pq" / "data" / "train-00000-of-00001.parquet"))
        return root / "pq"
    if kind == "save_to_disk":
        ds.save_to_disk(str(root / "disk"))
        return root / "disk"
    if kind == "dataset-dict":
        DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(root / "dict"))
        return root / "dict"
    if kind == "arrow":
        ds.save_to_disk(str(root / "disk"))
        return next((root / "disk").glob("*.arrow"))
    raise ValueError(kind)


def as_read(records) -> list[tuple]:
    """What a record is, whichever road it came by: id, turns, and its images' bytes."""
    return [(r.id, [(t.role, t.content) for t in r.turns],
             [i.read() if isinstance(i, RowImage) else i for i in r.images]) for r in records]


def json_as_read(path: Path, images: Path, ids: bool = True) -> list[tuple]:
    records, _ = read_records(path)
    return [(r.id if ids else f"#{n}", [(t.role, t.content) for t in r.turns],
             [(images / name).read_bytes() for name in r.images]) for n, r in enumerate(records)]


# ---- reading -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["parquet", "parquet-folder", "save_to_disk", "dataset-dict", "arrow"])
@pytest.mark.parametrize("layout", ["llava", "trl"])
def test_every_local_source_reads_the_json_records(tmp_path, kind, layout):
    path, images = make_toy_data(tmp_path)
    raw = json.loads(path.read_text())
    ds = llava_layout(raw, images) if layout == "llava" else trl_layout(raw, images)
    source = write_source(ds, tmp_path, kind)
    records, report = read_records(source)
    assert report.n_read == report.n_kept == 13 and not report.problems
    assert as_read(records) == json_as_read(path, images, ids=layout == "llava")
    assert all(r.source == str(source) for r in records)
    assert sum(not isinstance(i, str) for r in records for i in r.images) == 12  # references, read when needed


@pytest.mark.parametrize("kind", ["image", "name", "bytes"])
def test_one_image_column_of_every_kind(tmp_path, kind):
    """LLaVA-OneVision's ``image`` column: a ``datasets.Image``, a file name (relative to the dataset's folder)
    or bytes; null in a text-only row."""
    path, images = make_toy_data(tmp_path)
    raw = json.loads(path.read_text())
    values = [None if "image" not in r else _image(images, r["image"]) if kind == "image"
              else f"images/{r['image']}" if kind == "name" else (images / r["image"]).read_bytes() for r in raw]
    feature = {"image": Image(), "name": Value("string"), "bytes": Value("binary")}[kind]
    features = Features({"id": Value("string"), "image": feature,
                         "conversations": List({"from": Value("string"), "value": Value("string")})})
    columns = {"id": [r["id"] for r in raw], "image": values, "conversations": [r["conversations"] for r in raw]}
    Dataset.from_dict(columns, features=features).to_parquet(str(tmp_path / "d.parquet"))
    records, report = read_records(tmp_path / "d.parquet")
    assert report.n_kept == 13
    expected = json_as_read(path, images)
    if kind == "name":
        expected = [(i, turns, [f"images/{r['image']}"] if "image" in r else [])
                    for (i, turns, _), r in zip(expected, raw)]
        assert check_dataset(tmp_path / "d.parquet").n_kept == 13  # names found in the dataset's folder
    assert as_read(records) == expected


def test_hub_source_spelling():
    s = parse_source("hf://HuggingFaceM4/the_cauldron:vqav2/validation@4d3bd06")
    assert (s.repo, s.config, s.split, s.revision) == ("HuggingFaceM4/the_cauldron", "vqav2", "validation", "4d3bd06")
    s = parse_source("hf://lmms-lab/LLaVA-OneVision-Data:CLEVR-Math(MathV360K)")
    assert (s.repo, s.config, s.split, s.revision) == ("lmms-lab/LLaVA-OneVision-Data", "CLEVR-Math(MathV360K)",
                                                       "train", None)
    s = parse_source("hf://me/data@refs/convert/parquet")
    assert (s.repo, s.config, s.split, s.revision) == ("me/data", None, "train", "refs/convert/parquet")
    for bad in ("hf://onlyname", "hf://a/b/c/d", "hf://a/b:"):
        with pytest.raises(ValueError, match=r"hf://OWNER/NAME\[:CONFIG\]\[/SPLIT\]\[@REVISION\]"):
            parse_source(bad)


def test_unknown_layout_names_the_columns(tmp_path):
    Dataset.from_dict({"question": ["q"], "picture": ["x.png"]}).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(ValueError, match=r"no known record layout.*found columns: question, picture"):
        read_records(tmp_path / "a.parquet")
    Dataset.from_dict({"messages": [[]], "conversations": [[]]}).to_parquet(str(tmp_path / "b.parquet"))
    with pytest.raises(ValueError, match="both 'messages'.*and 'conversations'"):
        read_records(tmp_path / "b.parquet")
    Dataset.from_dict({"conversations": [[{"from": "human", "value": "q"}]], "image": [3]}).to_parquet(
        str(tmp_path / "c.parquet"))
    with pytest.raises(ValueError, match=r"column 'image' holds Value\('int64'\); expected datasets.Image"):
        read_records(tmp_path / "c.parquet")
    with pytest.raises(FileNotFoundError, match="no parquet file matches"):
        read_records(tmp_path / "missing.parquet")
    DatasetDict({"test": Dataset.from_dict({"conversations": [[]]})}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"no 'train' split \(splits: test\); name a split's folder"):
        read_records(tmp_path / "dict")


def bad_rows(root: Path) -> tuple[Path, Path]:
    """A LLaVA-layout parquet dataset with one row of every kind of trouble, and a TRL one; image files for the
    rows that name theirs."""
    images = root / "images"
    images.mkdir()
    for i in range(3):
        write_image(images / f"img{i}.png", i)
    (root / "secret.png").write_bytes((images / "img0.png").read_bytes())
    ok = _image(images, "img0.png")

    def conv(q="<image>\nWhat is it?", a="A thing."):
        return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]

    rows = [
        ("good", conv(), [ok]),
        ("pair", conv(q="<image> or <image>?"), [ok, _image(images, "img1.png")]),
        ("by-path", conv(), [{"bytes": None, "path": "images/img2.png"}]),  # relative to the dataset's folder
        ("text-only", conv(q="Hello?"), []),
        ("corrupt", conv(), [{"bytes": b"\xff\xd8\xff\xe0 not really a jpeg", "path": None}]),
        ("mismatch", conv(q="<image><image> Q"), [ok]),
        ("no-image", conv(), [{"bytes": None, "path": None}]),
        ("escape", conv(), [{"bytes": None, "path": "../secret.png"}]),
        ("no-answer", [{"from": "human", "value": "<image>\nQ"}], [ok]),
        ("role", [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}], [ok]),
    ]
    turn = {"from": Value("string"), "value": Value("string")}
    features = Features({"id": Value("string"), "conversations": List(turn), "images": List(Image())})
    ds = Dataset.from_dict({"id": [r[0] for r in rows], "conversations": [r[1] for r in rows],
                            "images": [r[2] for r in rows]}, features=features)
    ds.to_parquet(str(root / "bad.parquet"), batch_size=4)  # batch_size: no sizing of path-only images

    def msg(role, *parts):
        return {"role": role, "content": [{"type": t, "text": x} for t, x in parts]}

    trl_rows = [
        ([msg("user", ("image", None), ("text", "What?")), msg("assistant", ("text", "A dog."))], [ok]),
        ([msg("user", ("text", "Spells <image> here"), ("image", None)), msg("assistant", ("text", "x"))], [ok]),
        ([msg("user", ("text", "Q")), msg("assistant", ("image", None), ("text", "x"))], [ok]),
        ([msg("user", ("video", None)), msg("assistant", ("text", "x"))], []),
        ([msg("user", ("image", None), ("image", None), ("text", "Same?")), msg("assistant", ("text", "No."))],
         [ok, _image(images, "img1.png")]),
    ]
    trl = Dataset.from_dict({"messages": [r[0] for r in trl_rows], "images": [r[1] for r in trl_rows]})
    trl.cast_column("images", List(Image())).to_parquet(str(root / "trl.parquet"))
    return root / "bad.parquet", root / "trl.parquet"


LLAVA_REASONS = {
    "corrupt": "unreadable image",
    "mismatch": "bad placeholder: 2 '<image>' marker(s) in the user turns for 1 image(s)",
    "no-image": "bad field: 'images'[0] holds no image (no bytes and no path)",
    "escape": "image path escapes the images folder",
    "no-answer": "no answer",
    "role": "unknown role",
}
TRL_REASONS = {
    "#1": "bad placeholder: message 0 content[0] spells '<image>' in text; images are parts here",
    "#2": "bad placeholder: image part in a assistant message (message 1 content[0])",
    "#3": "malformed turn: message 0 content[0] is not an image or text part",
}


def test_data_check_reports_every_bad_row(tmp_path):
    llava, trl = bad_rows(tmp_path)
    report = check_dataset(llava)
    assert (report.n_read, report.n_kept) == (10, 4)  # good, pair, by-path, text-only
    by_id = {p.record: p for p in report.problems}
    assert set(by_id) == set(LLAVA_REASONS)
    for rid, reason in LLAVA_REASONS.items():
        assert by_id[rid].reason.startswith(reason), (rid, by_id[rid].reason)
        assert by_id[rid].file == str(llava)
    report = check_dataset(trl)
    assert (report.n_read, report.n_kept) == (5, 2)
    assert {p.record: p.reason[:len(TRL_REASONS[p.record])] for p in report.problems} == TRL_REASONS
    records, _ = read_records(trl)
    assert records[1].turns[0].content == "<image>\n<image>\nSame?"  # several images, as the processor lays parts out


def test_data_cli_check_and_stats_on_parquet(tmp_path, tiny_llama_dir):
    llava, _ = bad_rows(tmp_path)
    run = [sys.executable, "-m", "phiclip_cli", "data"]
    out = subprocess.run([*run, "check", str(llava)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "10 records read, 4 kept, 6 skipped" in out.stdout
    assert "record corrupt: unreadable image" in out.stdout
    (tmp_path / "toy").mkdir()
    path, images = make_toy_data(tmp_path / "toy")
    source = write_source(llava_layout(json.loads(path.read_text()), images), tmp_path / "toy", "parquet")
    stats = {}
    for data in (path, source):
        result = subprocess.run([*run, "stats", str(data), "--tokenizer", str(tiny_llama_dir), "--max-length", "45"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        stats[data] = result.stdout.splitlines()[1:]
    assert stats[source] == [line.replace("12 distinct files, ", "0 distinct files, 12 embedded in the dataset, ")
                             for line in stats[path]]


def test_to_parquet_writes_what_training_reads(tmp_path):
    path, images = make_toy_data(tmp_path)
    expected = json_as_read(path, images)
    records = json.loads(path.read_text())
    records.append({"id": "gone", "image": "missing.png", "conversations": records[0]["conversations"]})
    path.write_text(json.dumps(records))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "phiclip_cli", "data", "to-parquet", str(path), str(out),
                          "--images", str(images)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "14 records read, 13 kept, 1 skipped" in run.stdout and "record gone: missing image" in run.stdout
    assert [p.name for p in (out / "data").iterdir()] == ["train-00000-of-00001.parquet"]
    parquet, _ = read_records(out)
    assert as_read(parquet) == expected
    assert check_dataset(out).n_kept == 13
    again = subprocess.run([sys.executable, "-m", "phiclip_cli", "data", "to-parquet", str(path), str(out),
                            "--images", str(images)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already holds parquet files" in again.stderr


# ---- training and evaluating ---------------------------------------------------------------------------------


def losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def test_json_and_datasets_train_to_the_same_loss(tmp_path, tiny_llama_dir, tiny_clip_dir):
    from train.run import train

    path, images = make_toy_data(tmp_path)
    raw = json.loads(path.read_text())
    subprocess.run([sys.executable, "-m", "phiclip_cli", "data", "to-parquet", str(path), str(tmp_path / "pq"),
                    "--images", str(images)], check=True, capture_output=True, cwd=ROOT)
    trl = write_source(trl_layout(raw, images), tmp_path, "save_to_disk")
    curves = {}
    for name, data in (("json", (path, images)), ("parquet", (tmp_path / "pq", "")), ("trl", (trl, ""))):
        cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / name, max_steps=4)
        run = train(cfg)
        curves[name] = losses(run)
        report = json.loads((run / "data_report.json").read_text())
        assert (report["n_read"], report["n_kept"]) == (13, 13)
    assert len(curves["json"]) == 4
    assert curves["parquet"] == pytest.approx(curves["json"], rel=1e-5)
    assert curves["trl"] == pytest.approx(curves["json"], rel=1e-5)  # ids differ (#N), not the batches: no split


def test_bad_rows_never_stop_training_from_parquet(tmp_path, tiny_llama_dir, tiny_clip_dir):
    from train.run import train

    llava, _ = bad_rows(tmp_path)
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (llava, ""), tmp_path / "run", max_steps=4)
    report = json.loads((train(cfg) / "data_report.json").read_text())
    reasons = {p["record"]: p["reason"] for p in report["problems"]}
    assert set(reasons) == set(LLAVA_REASONS)  # the corrupt image found mid-run, by the row's id
    assert reasons["corrupt"].startswith("unreadable image")
    assert (report["n_read"], report["n_kept"]) == (10, 4)


def test_eval_on_a_dataset_answers_as_on_json(tiny_run, tmp_path):
    from chat.assistant import VisionChat
    from evaluation.evaluate import evaluate_run
    from evaluation.report import write_report

    path, images = make_toy_data(tmp_path)
    raw = json.loads(path.read_text())[:6]
    raw[1]["answers"] = ["dark", "bright"]
    raw[2]["question_type"] = "colour"
    path.write_text(json.dumps(raw))
    source = write_source(llava_layout(raw, images), tmp_path, "parquet")
    chat = VisionChat.load(tiny_run)
    on_json = evaluate_run(chat, path, images, batch_size=2, max_new_tokens=4, progress=False)
    on_parquet = evaluate_run(chat, source, "", batch_size=2, max_new_tokens=4, progress=False)
    keep = ("id", "question", "answer", "references", "question_type", "score")
    assert [{k: r[k] for k in keep} for r in on_parquet.rows] == [{k: r[k] for k in keep} for r in on_json.rows]
    assert on_parquet.rows[0]["image"] == f"{source} row 0 'images'[0]"
    page = write_report(on_parquet, tmp_path / "out", tiny_run).read_text()
    assert page.count("src='data:image/png;base64,") == 6 + 1  # every item's thumbnail and the loss curve


# ---- streaming -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, message", [
    ({"max_steps": -1}, r"set train\.max_steps"),
    ({"group_by_length": True}, r"set train\.group_by_length=false"),
    ({"val_fraction": 0.1}, r"data\.val_fraction"),
])
def test_streaming_refuses_what_it_cannot_honour(tmp_path, setting, message):
    from train.run import train

    cfg = tiny_config(tmp_path / "lm", tmp_path / "clip", (tmp_path / "d.parquet", ""), tmp_path / "run",
                      group_by_length=False)
    cfg.data.streaming = True
    for key, value in setting.items():
        setattr(cfg.data if key == "val_fraction" else cfg.train, key, value)
    with pytest.raises(ValueError, match=message):
        train(cfg)


def streaming_data(root: Path) -> Path:
    """The toy records as two parquet shards (LLaVA layout), with one corrupt image and one bad row."""
    path, images = make_toy_data(root)
    raw = json.loads(path.read_text())
    raw[5]["conversations"][0]["value"] = "<image> <image> two markers"
    (images / "img8.png").write_bytes(b"garbage")
    ds = llava_layout(raw, images, with_id=False)
    (root / "stream" / "data").mkdir(parents=True)
    for k in range(2):
        ds.shard(2, k, contiguous=True).to_parquet(str(root / "stream" / "data" / f"train-0000{k}-of-00002.parquet"))
    return root / "stream"


TRAIN_SCRIPT = """
import os, signal, sys, torch
torch.set_num_threads(1)
from transformers import TrainerCallback
import train.trainer as T
from runtime.config import load_config
from train.run import train

CRASH_AFTER = int(sys.argv[2])

class Crash(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        rank = os.environ.get("RANK", "0") == os.environ.get("CRASH_RANK", "0")
        if CRASH_AFTER and state.global_step >= CRASH_AFTER and rank:
            os.kill(os.getpid(), signal.SIGKILL)

init = T.PhiClipTrainer.__init__

def with_crash(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Crash())

T.PhiClipTrainer.__init__ = with_crash
train(load_config(sys.argv[1]), resume=len(sys.argv) > 3)
"""


def test_streamed_run_resumes_after_a_crash_with_the_same_losses(tmp_path, tiny_llama_dir, tiny_clip_dir):
    """Blocks of 5 rows, 2 rows a step, 8 steps: the run crosses into the second pass, the crash lands mid-block,
    and the straight run decodes in 2 worker processes while the crashed one decodes in its own: same losses."""
    data = streaming_data(tmp_path)
    script = tmp_path / "streamed_run.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    curves = {}
    for name, workers, crash in (("straight", 2, 0), ("crashed", 0, 4)):
        cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (data, ""), tmp_path / name, max_steps=8, save_steps=2,
                          group_by_length=False, dataloader_workers=workers)
        cfg.data.streaming, cfg.data.shuffle_buffer = True, 5
        cfg.save(tmp_path / f"{name}.yaml")
        run = [sys.executable, str(script), str(tmp_path / f"{name}.yaml")]
        first = subprocess.run([*run, str(crash)], env=env, capture_output=True, text=True, cwd=ROOT)
        if crash:
            assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
            assert (tmp_path / name / "checkpoints" / "checkpoint-4" / "stream_state.json").is_file()
            first = subprocess.run([*run, "0", "resume"], env=env, capture_output=True, text=True, cwd=ROOT)
        assert first.returncode == 0, first.stderr[-3000:]
        curves[name] = losses(tmp_path / name)
    assert len(curves["straight"]) == 8
    assert curves["crashed"] == pytest.approx(curves["straight"], rel=1e-4)
    for name in curves:
        report = json.loads((tmp_path / name / "data_report.json").read_text())
        assert (report["n_read"], report["n_kept"]) == (13, 11)  # the first pass, its two bad rows reported once
        assert {(p["record"], p["reason"].split(":")[0]) for p in report["problems"]} == {
            ("#5", "bad placeholder"), ("#8", "unreadable image")}


@pytest.mark.slow
def test_two_processes_stream_their_own_shards_and_resume(tmp_path, tiny_llama_dir, tiny_clip_dir):
    """``accelerate launch`` with two gloo processes: each reads one parquet shard (7 and 6 rows, one bad row in
    each), trains past its first pass, and a group torn down by a SIGKILL resumes to the same losses."""
    data = streaming_data(tmp_path)
    script = tmp_path / "streamed_run.py"
    script.write_text(TRAIN_SCRIPT)
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"), str(script)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "CRASH_RANK": "1"}
    curves = {}
    for name, crash in (("straight", 0), ("crashed", 4)):
        cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (data, ""), tmp_path / name, max_steps=7, save_steps=2,
                          batch_size=1, group_by_length=False)
        cfg.data.streaming, cfg.data.shuffle_buffer = True, 4
        cfg.save(tmp_path / f"{name}.yaml")
        run = [*launch, str(tmp_path / f"{name}.yaml")]
        first = subprocess.run([*run, str(crash)], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
        if crash:
            assert first.returncode != 0 and not (tmp_path / name / "model").exists(), first.stderr[-3000:]
            saved = json.loads((tmp_path / name / "checkpoints" / "checkpoint-4" / "stream_state.json").read_text())
            assert [s["position"]["epoch"] for s in saved] == [0, 0] and saved[0] != saved[1]
            first = subprocess.run([*run, "0", "resume"], env=env, capture_output=True, text=True, cwd=ROOT,
                                   timeout=600)
        assert first.returncode == 0, first.stderr[-3000:]
        curves[name] = losses(tmp_path / name)
        report = json.loads((tmp_path / name / "data_report.json").read_text())
        assert (report["n_read"], report["n_kept"]) == (13, 11)
        assert {(p["file"], p["record"]) for p in report["problems"]} == {
            (f"{data} (stream of rank 0 of 2)", "#5"), (f"{data} (stream of rank 1 of 2)", "#1")}
    assert len(curves["straight"]) == 7
    assert curves["crashed"] == pytest.approx(curves["straight"], rel=1e-4)


def test_each_process_streams_its_own_rows(tmp_path):
    from data.streaming import open_stream

    data = streaming_data(tmp_path)
    single = data / "data" / "train-00000-of-00002.parquet"  # one shard: every other row to each process
    for source, n in ((data, 13), (single, 7)):
        seen = []
        for rank in range(2):
            stream = open_stream(str(source), None, None, seed=0, block_rows=4, workers=0, rank=rank, world=2)
            assert stream.source == f"{source} (stream of rank {rank} of 2)"
            seen.append([row["images"][0]["bytes"] if row["images"] else b"text" for row in stream.rows])
        assert not set(seen[0]) & set(seen[1])
        assert len(seen[0]) + len(seen[1]) == n


def test_streamed_positions_cover_each_pass_once(tmp_path):
    """A pass yields every row of the stream once, shuffled within blocks, another order the next pass."""
    from data.streaming import open_stream

    stream = open_stream(str(streaming_data(tmp_path)), None, None, seed=3, block_rows=5, workers=0)
    passes = [[(row.index, position["block"]) for row, position in stream.pass_rows(epoch)] for epoch in (0, 1)]
    for rows in passes:
        assert sorted(i for i, _ in rows) == list(range(13))
        assert all(i // 5 == block for i, block in rows)
    assert [i for i, _ in passes[0]] != [i for i, _ in passes[1]]


# ---- the Hub -------------------------------------------------------------------------------------------------

HUB_CLIENT = """
import json, sys
from data.check import check_dataset
from data.sources import read_records
from data.hf_records import load_rows

out = {}
for source in sys.argv[1:]:
    records, report = read_records(source)
    out[source] = {"ids": [r.id for r in records], "read": report.n_read,
                   "checked": check_dataset(source).n_kept,
                   "streamed": [row.get("id") for row in load_rows(source, streaming=True)]}
print(json.dumps(out))
"""


def test_hub_dataset_through_the_local_hub(tmp_path):
    from hub_server import LocalHub, hub_env

    path, images = make_toy_data(tmp_path)
    raw = json.loads(path.read_text())
    llava, trl = llava_layout(raw, images), trl_layout(raw, images)
    for name, ds in (("llava-train", llava), ("llava-test", llava.select(range(3))), ("trl", trl)):
        ds.to_parquet(str(tmp_path / f"{name}.parquet"))
    readme = textwrap.dedent("""\
        ---
        configs:
        - config_name: llava
          data_files:
          - split: train
            path: llava/train-*.parquet
          - split: test
            path: llava/test-*.parquet
        - config_name: trl
          data_files:
          - split: train
            path: trl/train-*.parquet
        ---
        """).encode()
    repo = "local-user/toy-vqa"
    with LocalHub() as hub:
        hub.create_repo(repo, repo_type="dataset")
        first = hub.upload(repo, {"README.md": readme,
                                  "llava/train-00000-of-00001.parquet": (tmp_path / "llava-test.parquet").read_bytes(),
                                  "llava/test-00000-of-00001.parquet": (tmp_path / "llava-test.parquet").read_bytes(),
                                  "trl/train-00000-of-00001.parquet": (tmp_path / "trl.parquet").read_bytes()},
                           repo_type="dataset")
        hub.upload(repo, {"llava/train-00000-of-00001.parquet": (tmp_path / "llava-train.parquet").read_bytes()},
                   repo_type="dataset")
        env = {**hub_env(hub.url, tmp_path / "hf-home"), "HF_DATASETS_CACHE": str(tmp_path / "hf-home" / "datasets")}
        sources = [f"hf://{repo}:llava", f"hf://{repo}:llava@{first}", f"hf://{repo}:llava/test", f"hf://{repo}:trl"]
        client = subprocess.run([sys.executable, "-c", HUB_CLIENT, *sources], env=env, capture_output=True,
                                text=True, cwd=ROOT)
        assert client.returncode == 0, client.stderr[-3000:]
        assert not hub.unknown_requests()
    out = json.loads(client.stdout.splitlines()[-1])
    ids = [r["id"] for r in raw]
    assert out[sources[0]] == {"ids": ids, "read": 13, "checked": 13, "streamed": ids}
    assert out[sources[1]] == {"ids": ids[:3], "read": 3, "checked": 3, "streamed": ids[:3]}  # pinned: first commit
    assert out[sources[2]] == {"ids": ids[:3], "read": 3, "checked": 3, "streamed": ids[:3]}
    assert out[sources[3]]["ids"] == [f"#{i}" for i in range(13)] and out[sources[3]]["checked"] == 13
