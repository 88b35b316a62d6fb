"""Evaluation: VQA normalisation and accuracy, exact match, yes/no, captions, eval sets, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import write_image

from evaluation import metrics as M

# --- VQA normalisation and accuracy ---------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Yes.", "yes"),
        ("  Two  ", "2"),
        ("none", "0"),
        ("The red car", "red car"),
        ("the red one", "red 1"),
        ("an apple", "apple"),
        ("3.5", "3.5"),
        ("100,978", "100978"),
        ("dont", "don't"),
        ("Isnt it", "isn't it"),
        ("couldnt've", "couldn't've"),
        ("well", "well"),  # an ordinary word is not a broken contraction
        ("t-shirt", "t shirt"),
        ("10:30", "10:30"),
        ("it's (maybe) blue!", "it's maybe blue"),
        ("e.g. ten", "eg 10"),
        ("Line\none", "line 1"),
    ],
)
def test_normalize_answer(raw, expected):
    assert M.normalize_answer(raw) == expected


def test_vqa_accuracy_ten_answers():
    refs = ["2", "2", "two", "3", "3", "3", "3", "3", "3", "3"]
    # "2" given by 3 of 10: leaving out one of those three leaves 2 matches (2/3), else 3 (1.0).
    assert M.vqa_accuracy("2", refs) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert M.vqa_accuracy("Three.", refs) == pytest.approx(1.0)
    assert M.vqa_accuracy("4", refs) == 0.0
    one = ["cat"] + ["dog"] * 9
    assert M.vqa_accuracy("a cat", one) == pytest.approx(9 * (1 / 3) / 10)


def test_vqa_accuracy_few_answers():
    assert M.vqa_accuracy("red", ["red"]) == 1.0
    assert M.vqa_accuracy("red", ["red", "blue"]) == pytest.approx(0.5)
    assert M.vqa_accuracy("red", ["red", "red", "blue", "red"]) == 1.0
    assert M.vqa_accuracy("red", []) == 0.0


def test_exact_match():
    assert M.exact_match("The Circle.", ["circle"]) == 1.0
    assert M.exact_match("circle", ["square", "a circle"]) == 1.0
    assert M.exact_match("a red circle", ["circle"]) == 0.0


# --- yes/no ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "label"),
    [("Yes, there is.", "yes"), ("No.", "no"), ("There is no dog.", "no"), ("I don't think so", "no"),
     ("There is a dog in the image.", "yes"), ("", None)],
)
def test_yes_no_parsing(text, label):
    assert M.yes_no(text) == label


def test_yes_no_metrics_on_a_known_confusion():
    predicted = ["yes", "yes", "no", "no", "yes", None]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    out = M.yes_no_metrics(predicted, labels)
    # TP 2, FP 1, FN 1; correct: 3 of 6 (an unanswered item is never right).
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["yes_ratio"] == pytest.approx(0.5)
    assert out["unanswered"] == 1


# --- captions -------------------------------------------------------------------------------


def test_caption_metrics_identical_vs_unrelated():
    pytest.importorskip("pycocoevalcap", reason="caption metrics need pycocoevalcap")
    refs = [["a red circle on the left side of the image"], ["two small blue squares at the bottom right"],
            ["a green triangle in the middle of a white background"]]
    same, per_item = M.caption_scores([r[0] for r in refs], refs)
    assert same["bleu4"] > 0.9 and same["rouge_l"] > 0.9 and same["cider"] > 1.0
    assert len(per_item) == 3 and all(item["cider"] > 1.0 for item in per_item)
    other, _ = M.caption_scores(["an elephant eats grass", "mountains under snow", "people playing cards"], refs)
    assert other["bleu4"] < 0.05 and other["rouge_l"] < 0.2 and other["cider"] < 0.1


def test_choose_metric():
    assert M.choose_metric([["Yes"], ["no"]]) == "yesno"
    assert M.choose_metric([["a red circle on the left of the picture"]]) == "caption"
    assert M.choose_metric([["red", "red", "crimson"], ["2"]]) == "vqa"
    assert M.choose_metric([["red"], ["2"]]) == "exact"


# --- eval sets ------------------------------------------------------------------------------


def _eval_set(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        write_image(images / f"e{i}.png", 100 + i)
    records = [
        {"id": "q0", "image": "e0.png", "question_type": "colour",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "q1", "image": "e1.png", "question_type": "count",
         "conversations": [{"from": "human", "value": "How many?"}],
         "answers": [{"answer": "2"}, {"answer": "two"}, {"answer": "3"}]},
        {"id": "q2", "image": "e2.png", "question_type": "colour",
         "conversations": [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "Noisy."},
                           {"from": "human", "value": "Main colour?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "q3", "image": "e3.png",
         "conversations": [{"from": "human", "value": "Shape?"}, {"from": "gpt", "value": "circle"}]},
        {"id": "t0", "conversations": [{"from": "human", "value": "Capital of France?"}, {"from": "gpt", "value": "Paris"}]},
        {"id": "bad-missing-image", "image": "nope.png",
         "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"id": "bad-no-reference", "conversations": [{"from": "human", "value": "Hello?"}]},
    ]
    data = root / "eval.json"
    data.write_text(json.dumps(records))
    return data, images


def test_load_eval_set(tmp_path):
    from evaluation.evaluate import load_eval_set

    data, images = _eval_set(tmp_path)
    items, report = load_eval_set(data, images)
    assert [it.id for it in items] == ["q0", "q1", "q2", "q3", "t0"]
    assert report.n_read == 7 and len(report.problems) == 2
    reasons = " ".join(p.reason for p in report.problems)
    assert "missing image" in reasons and "no reference" in reasons
    by_id = {it.id: it for it in items}
    assert by_id["q1"].references == ["2", "two", "3"]
    assert by_id["q1"].messages[-1]["content"].startswith("<image>")
    q2 = by_id["q2"]
    assert q2.references == ["blue"] and q2.question == "Main colour?"
    assert [m["role"] for m in q2.messages] == ["user", "assistant", "user"]
    assert by_id["t0"].images == [] and by_id["q0"].question_type == "colour"
    limited, _ = load_eval_set(data, images, limit=2)
    assert len(limited) == 2
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in json.loads(data.read_text())) + "\n{broken\n")
    items_jsonl, report_jsonl = load_eval_set(jsonl, images)
    assert len(items_jsonl) == 5 and report_jsonl.n_read == 8


def test_eval_sets_are_read_like_training_data(tmp_path):
    """One reader: a broken line or file is reported the same way by evaluation and training."""
    from data.sources import read_records
    from evaluation.evaluate import load_eval_set

    data, images = _eval_set(tmp_path)
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in json.loads(data.read_text())) + "\n{broken\n")
    broken_line = [vars(p) for p in load_eval_set(jsonl, images)[1].problems if "malformed" in p.reason]
    assert broken_line == [vars(p) for p in read_records(jsonl)[1].problems if "malformed" in p.reason]
    assert broken_line[0]["record"] == "line 8" and broken_line[0]["file"] == str(jsonl)
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "a",')
    for read in (read_records, load_eval_set):
        with pytest.raises(ValueError, match=r"broken\.json: not valid JSON \(line 1"):
            read(broken)


def test_score_answers_by_type(tmp_path):
    from evaluation.evaluate import load_eval_set, score_answers

    data, images = _eval_set(tmp_path)
    items, _ = load_eval_set(data, images)
    result = score_answers(items, ["Red.", "two", "green", "a circle", "Paris"], metric="exact")
    m = result.metrics
    assert m["metric"] == "exact" and m["n"] == 5
    assert m["exact_match"] == pytest.approx(4 / 5) and m["score"] == m["exact_match"]
    assert m["by_type"] == {"colour": 0.5, "count": 1.0}
    assert m["by_type_n"] == {"colour": 2, "count": 1}
    vqa = score_answers(items, ["Red.", "two", "green", "a circle", "Paris"], metric="vqa").metrics
    # "two" matches 2 of 3 references ("2", "two"): min(2/3, 1)
    assert vqa["by_type"]["count"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="metric"):
        score_answers(items, ["x"] * 5, metric="bleu")


@pytest.fixture(scope="module")
def tiny_eval(tiny_run, tmp_path_factory):
    from chat.assistant import VisionChat
    from evaluation.evaluate import evaluate_run

    root = tmp_path_factory.mktemp("eval-set")
    data, images = _eval_set(root)
    chat = VisionChat.load(tiny_run)
    result = evaluate_run(chat, data, images, batch_size=2, max_new_tokens=4, progress=False)
    return result, data, images


def test_evaluate_run_on_tiny_run(tiny_eval):
    result, data, _ = tiny_eval
    m = result.metrics
    assert m["n"] == 5 and m["n_skipped"] == 2
    assert m["metric"] == "vqa"  # q1 has several answers
    assert isinstance(m["exact_match"], float) and 0.0 <= m["vqa_accuracy"] <= 1.0
    assert set(m["by_type"]) == {"colour", "count"}
    assert m["data"] == str(data)
    assert [r["id"] for r in result.rows] == ["q0", "q1", "q2", "q3", "t0"]
    for row in result.rows:
        assert isinstance(row["answer"], str)
        assert {"id", "question", "answer", "references", "score", "correct", "image"} <= set(row)
    assert result.rows[4]["image"] is None and result.rows[0]["image"].endswith("e0.png")


def test_report_is_self_contained(tiny_eval, tiny_run, tmp_path):
    from evaluation.report import write_report

    result, _, _ = tiny_eval
    page = write_report(result, tmp_path / "out", tiny_run)
    assert page == tmp_path / "out" / "report.html" and page.is_file()
    text = page.read_text()
    # 4 item thumbnails + the loss curve, all inline; nothing loaded from elsewhere.
    assert text.count("src='data:image/png;base64,") == 5
    assert "alt='loss curve'" in text
    assert "src='http" not in text and "src='/" not in text
    assert "What colour?" in text and "Capital of France?" in text
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["n"] == 5 and "by_type" in saved
    assert len((tmp_path / "out" / "answers.jsonl").read_text().splitlines()) == 5


def test_compare_table(tmp_path, capsys):
    from evaluation.report import compare_table
    from phiclip_cli import main

    for name, score, types in (("run-a", 0.5, {"colour": 0.25}), ("run-b", 0.75, {"count": 1.0})):
        folder = tmp_path / name / "eval" / "shapes"
        folder.mkdir(parents=True)
        metrics = {"metric": "vqa", "n": 8, "score": score, "exact_match": score, "vqa_accuracy": score,
                   "by_type": types, "run": name}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    table = compare_table([tmp_path / "run-a", tmp_path / "run-b" / "eval" / "shapes" / "metrics.json"])
    lines = table.splitlines()
    assert lines[0].split() == ["eval", "metric", "n", "score", "exact_match", "vqa_accuracy", "type:colour", "type:count"]
    assert "run-a" in lines[2] and "0.5000" in lines[2] and "0.2500" in lines[2]
    assert "run-b" in lines[3] and "1.0000" in lines[3] and lines[3].split()[-2] == "-"
    assert main(["eval", "--compare", str(tmp_path / "run-a"), str(tmp_path / "run-b")]) == 0
    assert "run-b" in capsys.readouterr().out
    assert main(["eval", "--compare", str(tmp_path / "nowhere")]) == 2


def test_eval_cli(tiny_run, tmp_path, capsys):
    from phiclip_cli import main

    data, images = _eval_set(tmp_path)
    out = tmp_path / "out"
    code = main(["eval", str(tiny_run), str(data), "--images", str(images), "--metric", "exact",
                 "--batch-size", "4", "--limit", "3", "--max-new-tokens", "2", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "exact" and metrics["n"] == 3
    assert (out / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out
    assert main(["eval", str(tiny_run)]) == 2


def test_score_answers_yesno_and_caption():
    from evaluation.evaluate import EvalItem, score_answers

    def items(refs):
        return [EvalItem(id=str(i), messages=[{"role": "user", "content": "Q?"}], references=[ref], question_type="pope")
                for i, ref in enumerate(refs)]

    yes_no = items(["yes", "No", "yes", "no"])
    result = score_answers(yes_no, ["Yes.", "yes", "There is a dog.", "No, there is not."])
    m = result.metrics
    assert m["metric"] == "yesno"  # auto: every reference is yes/no
    assert m["accuracy"] == pytest.approx(0.75) and m["yes_ratio"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(1.0)
    assert [r["correct"] for r in result.rows] == [True, False, True, True]
    assert m["by_type"] == {"pope": pytest.approx(0.75)}
    # A sentence reference still reads as its yes/no when the metric is asked for.
    forced = score_answers(items(["Yes, there is one."]), ["yes"], metric="yesno").metrics
    assert forced["accuracy"] == 1.0

    pytest.importorskip("pycocoevalcap", reason="caption metrics need pycocoevalcap")
    captions = items(["a red circle on the left side", "two blue squares near the top", "a green triangle in the middle"])
    result = score_answers(captions, ["a red circle on the left side", "mountains", "a green triangle in the middle"])
    m = result.metrics
    assert m["metric"] == "caption" and {"bleu4", "rouge_l", "cider"} <= set(m)
    scores = [r["score"] for r in result.rows]
    assert scores[0] > 1.0 and scores[2] > 1.0 and scores[1] < 0.1
