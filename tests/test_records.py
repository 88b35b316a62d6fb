"""Every kind of bad record is reported with file, id and reason, skipped, and counted."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_image
from PIL import Image

from data.check import check_dataset
from data.images import ImageResolver
from data.sources import read_records
from processing_phiclip import open_image, prepare_image


def conv(q="<image>\nWhat?", a="A thing."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def bad_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "ok.png", 0)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    full = images / "full.jpg"
    write_image(full, 1, size=64)
    (images / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    (tmp_path / "secret.png").write_bytes((images / "ok.png").read_bytes())
    records = [
        {"id": "good", "image": "ok.png", "conversations": conv()},
        {"id": "good", "image": "ok.png", "conversations": conv(a="Same id, kept too.")},
        {"id": "text-only", "conversations": conv(q="Hello?")},
        {"id": "missing", "image": "nope.png", "conversations": conv()},
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": conv()},
        {"id": "truncated", "image": "truncated.jpg", "conversations": conv()},
        {"id": "escape", "image": "../secret.png", "conversations": conv()},
        {"id": "absolute", "image": str(tmp_path / "secret.png"), "conversations": conv()},
        {"id": "empty", "image": "ok.png", "conversations": []},
        {"id": "no-answer", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nQ"}]},
        {"id": "blank-answer", "image": "ok.png", "conversations": conv(a="   ")},
        {"id": "null", "image": "ok.png", "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "x"}]},
        {"id": "number", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": 3}]},
        {"id": "role", "image": "ok.png", "conversations": [{"from": "robot", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
        {"id": "order", "image": "ok.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "<image>"}]},
        {"id": "two-placeholders", "image": "ok.png", "conversations": conv(q="<image><image> Q")},
        {"id": "placeholder-no-image", "conversations": conv()},
        "not an object",
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path, images


EXPECTED = {
    "missing": "missing image",
    "corrupt": "unreadable image",
    "truncated": "unreadable image",
    "escape": "escapes the images folder",
    "absolute": "escapes the images folder",
    "empty": "empty conversation",
    "no-answer": "no answer",
    "blank-answer": "no answer",
    "null": "non-string value",
    "number": "non-string value",
    "role": "unknown role",
    "order": "malformed conversation",
    "two-placeholders": "bad placeholder",
    "placeholder-no-image": "placeholder without image",
    "#17": "not an object",
}


def test_check_reports_every_bad_record(bad_data):
    path, images = bad_data
    report = check_dataset(path, images)
    assert report.n_read == 18
    assert report.n_kept == 3  # both "good" records (shared id) and the text-only one
    by_id = {p.record: p for p in report.problems}
    assert set(by_id) == set(EXPECTED)
    for rid, reason in EXPECTED.items():
        assert reason in by_id[rid].reason, (rid, by_id[rid].reason)
        assert by_id[rid].file == str(path)
    assert f"18 records read, 3 kept, {len(EXPECTED)} skipped" in report.summary()


def test_data_check_cli_prints_report(bad_data):
    path, images = bad_data
    out = subprocess.run(
        [sys.executable, "-m", "phiclip_cli", "data", "check", str(path), "--images", str(images)],
        capture_output=True, text=True, check=True,
    ).stdout
    assert "18 records read, 3 kept" in out
    assert "record truncated: unreadable image" in out
    assert "record escape: image path escapes the images folder" in out


def test_jsonl_malformed_line_is_counted(tmp_path):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"id": "a", "conversations": conv(q="Hi")})
    path.write_text(f"{good}\n{{broken\n{good}\n")
    records, report = read_records(path)
    assert len(records) == 2 and report.n_read == 3
    assert report.problems[0].record == "line 2" and "malformed JSON" in report.problems[0].reason


def test_placeholder_at_end_and_missing_placeholder(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"id": "end", "image": "x.png", "conversations": conv(q="What is it?\n<image>")},
        {"id": "none", "image": "x.png", "conversations": conv(q="What is it?")},
    ]))
    records, report = read_records(path)
    assert not report.problems
    assert records[0].turns[0].content == "What is it?\n<image>"
    assert records[1].turns[0].content.startswith("<image>")


@pytest.mark.parametrize("mode", ["CMYK", "L", "RGBA", "P", "LA", "I;16", "1"])
def test_unusual_modes_load_as_rgb(tmp_path, mode):
    path = tmp_path / f"img.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    if mode == "I;16":
        Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)).save(path)
    else:
        write_image(path, 3, size=32, mode=mode)
    image = prepare_image(open_image(path), "crop")
    assert image.mode == "RGB" and image.size == (32, 32)
    if mode == "I;16":
        assert np.asarray(image).max() > 200  # scaled from 16 bit, not clipped to black/white


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "t.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    assert prepare_image(open_image(path)).getpixel((0, 0)) == (255, 255, 255)


def test_decompression_bomb_is_refused(tmp_path):
    from processing_phiclip import ImageError

    path = write_image(tmp_path / "big.png", 0, size=100)
    with pytest.raises(ImageError, match="too large"):
        open_image(path, max_pixels=5000)


@pytest.mark.parametrize("on_disk", ["000000033471.jpg", "COCO_train2014_000000033471.jpg", "train2017/000000033471.jpg"])
def test_coco_names_resolve_both_ways(tmp_path, on_disk):
    target = tmp_path / on_disk
    target.parent.mkdir(parents=True, exist_ok=True)
    write_image(target, 0)
    resolver = ImageResolver(tmp_path)
    assert resolver.resolve("000000033471.jpg") == target.resolve()
    assert resolver.resolve("COCO_train2014_000000033471.jpg") == target.resolve()


def test_data_stats_counts_records_turns_and_long_ones(toy_data, tiny_llama_dir):
    from data.stats import dataset_stats

    path, _ = toy_data
    text = dataset_stats(path, tokenizer=str(tiny_llama_dir), max_length=45)
    assert "records: 13 usable of 13 read (0 malformed)" in text
    assert "images: 12 in 12 records, 12 distinct files, 1 text-only records" in text
    assert "images per record: 0: 1, 1: 12" in text
    assert "answers per record: 1: 1, 2: 12" in text
    over = int(text.split("records over max_length 45 before image tokens: ")[1].split()[0])
    assert over == 12  # every two-turn record is longer than 45 tokens, the one-line text record is not
    assert "token-length histogram:" in text


def test_several_images_in_any_user_turn(tmp_path):
    """LLaVA-OneVision's convention: a list of images, one <image> per image, in any human turn."""
    two_turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
                 {"from": "human", "value": "And here? <image>"}, {"from": "gpt", "value": "A dog, not <image>."}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"id": "pair", "image": ["a.png", "b.png"], "conversations": two_turns},
        {"id": "images-key", "images": ["a.png", "b.png"], "conversations": conv(q="<image> and <image>?")},
        {"id": "mismatch", "image": ["a.png", "b.png"], "conversations": conv()},
        {"id": "unmarked-pair", "images": ["a.png", "b.png"], "conversations": conv(q="Same?")},
        {"id": "both-keys", "image": "a.png", "images": ["b.png"], "conversations": conv()},
        {"id": "bad-entry", "images": ["a.png", 3], "conversations": conv()},
    ]))
    records, report = read_records(path)
    assert [r.id for r in records] == ["pair", "images-key"]
    assert records[0].images == ["a.png", "b.png"] and records[1].images == ["a.png", "b.png"]
    reasons = {p.record: p.reason for p in report.problems}
    assert reasons["mismatch"] == "bad placeholder: 1 '<image>' marker(s) in the user turns for 2 image(s)"
    assert reasons["unmarked-pair"] == "bad placeholder: 0 '<image>' marker(s) in the user turns for 2 image(s)"
    assert reasons["both-keys"].startswith("bad field: both 'image' and 'images'")
    assert reasons["bad-entry"].startswith("bad field: 'images'[1] must be a non-empty string")


def test_data_check_counts_text_that_spells_special_tokens(tmp_path, tiny_llama_dir):
    images = tmp_path / "images"
    images.mkdir()
    write_image(images / "ok.png", 0)
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"id": "plain", "image": "ok.png", "conversations": conv()},
        {"id": "spells", "image": "ok.png", "conversations": conv(a="Type <|im_end|> to stop.")},
        {"id": "marker-in-answer", "conversations": conv(q="Hi", a="Write <image> in HTML as &lt;image&gt;.")},
    ]))
    report = check_dataset(path, images, tokenizer=str(tiny_llama_dir))
    assert report.n_kept == 3 and not report.problems
    assert sum(report.notes.values()) == 2
    assert "note: 2 kept record(s): text spells a special token" in report.summary()
