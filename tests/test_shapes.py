"""Tests for the synthetic shapes scenes and dataset (offline.shapes, offline.shapes_data)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offline.shapes import (
    ATTRIBUTES,
    COLORS,
    COUNTS,
    QUESTION_TEMPLATES,
    QUESTION_TYPES,
    SHAPES,
    SIDES,
    ShapeScene,
    answer_for,
    render_scene,
    sample_scene,
    scene_labels,
)
from offline.shapes_data import make_shapes_dataset

N_TRAIN, N_EVAL = 24, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes") / "ds", N_TRAIN, N_EVAL, seed=3)


def _pixels_hash(path: Path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def _parse_answer(question_type: str, answer: str) -> dict[str, object]:
    """Recover attributes from an answer, checking its grammar."""
    if question_type == "color":
        m = re.fullmatch(r"The (shape is|shapes are) (\w+)\.", answer)
        assert m, answer
        return {"plural": m.group(1) == "shapes are", "color": m.group(2)}
    if question_type == "shape":
        m = re.fullmatch(r"(It is an? |They are )(\w+)\.", answer)
        assert m, answer
        plural = m.group(1) == "They are "
        word = m.group(2)
        singular = (word[:-2] if word.endswith("sses") else word[:-1]) if plural else word
        assert singular in SHAPES, answer
        return {"plural": plural, "shape": singular}
    if question_type == "count":
        m = re.fullmatch(r"There (is|are) (\d) (shape|shapes)\.", answer)
        assert m, answer
        n = int(m.group(2))
        assert (m.group(1) == "is") == (n == 1) and (m.group(3) == "shape") == (n == 1), answer
        return {"plural": n > 1, "count": n}
    m = re.fullmatch(r"(It is|They are) on the (left|right)\.", answer)
    assert m, answer
    return {"plural": m.group(1) == "They are", "side": m.group(2)}


def _scene_attrs(scene: ShapeScene) -> dict[str, object]:
    return {"color": scene.color, "shape": scene.shape, "count": scene.count, "side": scene.side}


def test_sample_scene_geometry_and_labels() -> None:
    rng = np.random.default_rng(0)
    seen = {k: set() for k in QUESTION_TYPES}
    for _ in range(300):
        s = sample_scene(rng)
        assert s.color in COLORS and s.shape in SHAPES and s.count in COUNTS and s.side in SIDES
        assert len(s.centers) == len(s.sizes) == s.count
        for (x, y), size in zip(s.centers, s.sizes):
            r = size / 2
            assert (x + r < 0.5) if s.side == "left" else (x - r > 0.5)
            assert 0 < y - r and y + r < 1
        for i in range(s.count):
            for j in range(i):
                d = np.hypot(s.centers[i][0] - s.centers[j][0], s.centers[i][1] - s.centers[j][1])
                assert d > (s.sizes[i] + s.sizes[j]) / 2  # non-overlapping
        labels = scene_labels(s)
        for k, v in labels.items():
            assert ATTRIBUTES[k][v] == _scene_attrs(s)[k]
            seen[k].add(v)
    assert all(len(seen[k]) == len(ATTRIBUTES[k]) for k in QUESTION_TYPES)


def test_render_scene_is_deterministic_and_places_shapes_on_side() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = sample_scene(rng)
        a, b = render_scene(s, 64), render_scene(s, 64)
        assert a.mode == "RGB" and a.size == (64, 64)
        arr = np.asarray(a).astype(int)
        assert np.array_equal(arr, np.asarray(b))
        # the colored (saturated) pixels are all in the announced half
        sat = arr.max(-1) - arr.min(-1) > 60
        assert sat.any()
        cols = np.nonzero(sat.any(0))[0]
        assert (cols.max() < 32) if s.side == "left" else (cols.min() >= 32)
    assert render_scene(s, 96).size == (96, 96)


def test_answers_grammar() -> None:
    base = {
        "color": "red",
        "side": "left",
        "centers": ((0.2, 0.2),),
        "sizes": (0.2,),
        "rgb": (1, 2, 3),
        "background": (250, 250, 250),
        "noise_seed": 0,
    }
    one = ShapeScene(shape="triangle", count=1, **base)
    three = ShapeScene(shape="cross", count=3, **base)
    assert answer_for(one, "color") == "The shape is red."
    assert answer_for(three, "color") == "The shapes are red."
    assert answer_for(one, "shape") == "It is a triangle."
    assert answer_for(three, "shape") == "They are crosses."
    assert answer_for(one, "count") == "There is 1 shape."
    assert answer_for(three, "count") == "There are 3 shapes."
    assert answer_for(one, "side") == "It is on the left."
    assert answer_for(three, "side") == "They are on the left."


def test_llava_format_and_answers_consistent(dataset) -> None:
    train = json.loads(dataset.train_json.read_text())
    evals = json.loads(dataset.eval_json.read_text())
    assert len(train) == N_TRAIN and len(evals) == N_EVAL * len(QUESTION_TYPES)
    all_questions = {q: qt for qt, qs in QUESTION_TEMPLATES.items() for q in qs}
    ends = 0
    for rec in train + evals:
        conv = rec["conversations"]
        assert (dataset.images_dir / rec["image"]).is_file()
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2) and len(conv) % 2 == 0
        assert sum(t["value"].count("<image>") for t in conv) == 1
        first = conv[0]["value"]
        assert first.startswith("<image>\n") or first.endswith("\n<image>")
        ends += first.endswith("\n<image>")
        qtypes = []
        plural = set()
        for h, g in zip(conv[::2], conv[1::2]):
            q = h["value"].replace("<image>", "").strip()
            qt = all_questions[q]
            qtypes.append(qt)
            parsed = _parse_answer(qt, g["value"])
            plural.add(parsed.pop("plural"))
            for k, v in parsed.items():
                assert str(v) in {str(x) for x in ATTRIBUTES[k]}
            rec.setdefault("_attrs", {}).update(parsed)
        assert len(plural) == 1  # grammar agrees across turns
        if "question_type" in rec:
            assert rec["id"].startswith("shapes-eval-") and rec["image"].startswith("eval-")
            assert len(conv) == 2 and qtypes == [rec["question_type"]]
        else:
            assert rec["id"].startswith("shapes-train-") and rec["image"].startswith("train-")
            assert sorted(qtypes) == sorted(QUESTION_TYPES)
            assert plural == {rec["_attrs"]["count"] > 1}
    assert 0 < ends < len(train) + len(evals)
    # eval: the 4 records of one image agree with each other
    by_image: dict[str, dict] = {}
    for rec in evals:
        by_image.setdefault(rec["image"], {}).update(rec["_attrs"])
    assert all(set(a) == set(QUESTION_TYPES) for a in by_image.values())
    assert len(by_image) == N_EVAL


def test_answers_match_regenerated_scenes(dataset) -> None:
    """Answers correspond to the scenes that were rendered (same rng stream)."""
    rng = np.random.default_rng([3, 1])
    train = json.loads(dataset.train_json.read_text())
    all_questions = {q: qt for qt, qs in QUESTION_TEMPLATES.items() for q in qs}
    for rec in train:
        scene = sample_scene(rng)
        assert np.array_equal(
            np.asarray(Image.open(dataset.images_dir / rec["image"])), np.asarray(render_scene(scene))
        )
        for h, g in zip(rec["conversations"][::2], rec["conversations"][1::2]):
            qt = all_questions[h["value"].replace("<image>", "").strip()]
            assert g["value"] == answer_for(scene, qt)


def test_eval_images_disjoint_from_train(dataset) -> None:
    train = {_pixels_hash(p) for p in dataset.images_dir.glob("train-*.png")}
    evals = {_pixels_hash(p) for p in dataset.images_dir.glob("eval-*.png")}
    assert len(train) == N_TRAIN and len(evals) == N_EVAL
    assert not train & evals


def test_determinism(tmp_path: Path, dataset) -> None:
    same = make_shapes_dataset(tmp_path / "same", N_TRAIN, N_EVAL, seed=3)
    other = make_shapes_dataset(tmp_path / "other", N_TRAIN, N_EVAL, seed=4)
    assert same.train_json.read_text() == dataset.train_json.read_text()
    assert same.eval_json.read_text() == dataset.eval_json.read_text()
    names = sorted(p.name for p in dataset.images_dir.glob("*.png"))
    assert names == sorted(p.name for p in same.images_dir.glob("*.png"))
    assert all(_pixels_hash(dataset.images_dir / n) == _pixels_hash(same.images_dir / n) for n in names)
    assert other.train_json.read_text() != dataset.train_json.read_text()
    assert any(_pixels_hash(dataset.images_dir / n) != _pixels_hash(other.images_dir / n) for n in names)


def test_reuse_does_not_rewrite(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ds = make_shapes_dataset(root, 5, 2, seed=0)
    files = [ds.train_json, ds.eval_json, root / "manifest.json", *ds.images_dir.glob("*.png")]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["n_train_images"] == 5 and manifest["seed"] == 0 and manifest["image_size"] == 64
    again = make_shapes_dataset(root, 5, 2, seed=0)
    assert again == ds
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    # different params -> regenerated
    make_shapes_dataset(root, 6, 2, seed=0)
    assert len(json.loads(ds.train_json.read_text())) == 6
    # a missing image -> regenerated
    (ds.images_dir / "train-000001.png").unlink()
    make_shapes_dataset(root, 6, 2, seed=0)
    assert (ds.images_dir / "train-000001.png").is_file()


def test_two_image_records(tmp_path: Path) -> None:
    """Pair records: LLaVA-OneVision layout, answers from the two rendered scenes, eval pairs on eval images only."""
    from offline.shapes import PAIR_QUESTIONS, pair_answer

    ds = make_shapes_dataset(tmp_path / "pairs", 12, 6, seed=1, n_train_pairs=9, n_eval_pairs=5)
    train = json.loads(ds.train_json.read_text())
    pairs = [r for r in train if isinstance(r["image"], list)]
    held_out = json.loads(ds.eval_pairs_json.read_text())
    assert len(train) == 12 + 9 and len(pairs) == 9 and len(held_out) == 5
    scenes = {f"train-{i:06d}.png": sample_scene(rng) for rng in [np.random.default_rng([1, 1])] for i in range(12)}
    scenes |= {f"eval-{i:06d}.png": sample_scene(rng) for rng in [np.random.default_rng([1, 3])] for i in range(6)}
    for rec in pairs + held_out:
        first, second = rec["image"]
        split = "eval" if rec in held_out else "train"
        assert first.startswith(split) and second.startswith(split) and first != second
        human, gpt = rec["conversations"]
        assert human["value"].count("<image>") == 2
        assert human["value"].replace("<image>\n", "") in PAIR_QUESTIONS
        assert gpt["value"] == pair_answer(scenes[first], scenes[second])
    from data.sources import read_records

    records, report = read_records(ds.eval_pairs_json)
    assert not report.problems and all(len(r.images) == 2 for r in records)
