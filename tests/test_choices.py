"""Scoring answers by likelihood (chat.scoring), the choice metric of ``phiclip eval``, and eval sets written as
lmms-eval tasks (evaluation.lmms_tasks). The lmms-eval run itself is in tests/test_lmms_eval.py."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from helpers import write_image

from processing_phiclip import IGNORE_INDEX


@pytest.fixture(scope="module")
def chat(tiny_run):
    from chat.assistant import VisionChat

    return VisionChat.load(tiny_run)


def _loss_logprob(chat, messages, images, answer) -> float:
    """The answer's log-probability read off the model's own training loss (mean over the labelled tokens)."""
    messages = chat.with_images(messages, len(images))
    ids, labels, _ = chat.processor.encode_chat([*messages, {"role": "assistant", "content": answer}])
    with torch.no_grad():
        pixels = chat.processor.image_pixels(images) if images else None
        out = chat.model(input_ids=torch.tensor([ids]), pixel_values=pixels, labels=torch.tensor([labels]))
    return -float(out.loss) * sum(label != IGNORE_INDEX for label in labels)


def test_scores_equal_the_training_loss_on_both_routes(chat, tmp_path):
    from chat.scoring import score_continuations

    write_image(tmp_path / "a.png", 7)
    image = [str(tmp_path / "a.png")]
    question = [{"role": "user", "content": "What colour is it?"}]
    answers = ["red", "a rather long answer about the colour", "blue"]
    scores = score_continuations(chat, [question] * 3 + [question], [image] * 3 + [[]], [*answers, "red"],
                                 batch_size=2)
    from processing_phiclip import open_image

    opened = [open_image(image[0])]
    for answer, score in zip(answers, scores):
        assert score.logprob == pytest.approx(_loss_logprob(chat, question, opened, answer), abs=1e-3)
        assert score.logprob < 0 and score.n_tokens >= 2  # the answer and its end-of-turn marker
    # Text only: the base LM with the adapter off, as generation routes it.
    with chat.model.adapter_disabled():
        base = _loss_logprob(chat, question, [], "red")
    assert scores[3].logprob == pytest.approx(base, abs=1e-3)
    assert scores[3].logprob != pytest.approx(_loss_logprob(chat, question, [], "red"), abs=1e-6)


def test_scores_refuse_what_they_cannot_score(chat):
    from chat.scoring import score_continuations

    with pytest.raises(ValueError, match="one of each per row"):
        score_continuations(chat, [[{"role": "user", "content": "?"}]], [], ["a"])
    with pytest.raises(ValueError, match="row 0: the conversation must end with a user turn"):
        score_continuations(chat, [[{"role": "assistant", "content": "?"}]], [[]], ["a"])
    with pytest.raises(ValueError, match="row 0: .* over the LM's context"):
        score_continuations(chat, [[{"role": "user", "content": "word " * 5000}]], [[]], ["a"])


def _choice_set(root):
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        write_image(images / f"c{i}.png", 40 + i)
    records = [
        {"id": f"c{i}", "image": f"c{i}.png", "choices": ["red", "green", "blue"],
         "conversations": [{"from": "human", "value": "<image>\nWhich colour?"}, {"from": "gpt", "value": ref}]}
        for i, ref in enumerate(["red", "blue", "green"])
    ]
    records += [
        {"id": "no-choices", "image": "c0.png",
         "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "bad-choices", "image": "c0.png", "choices": ["green", "blue"],
         "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]},
        {"id": "two-turns", "image": "c1.png", "choices": ["red", "blue"],
         "conversations": [{"from": "human", "value": "<image>\nLook."}, {"from": "gpt", "value": "I see it."},
                           {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "blue"}]},
    ]
    data = root / "choices.json"
    data.write_text(json.dumps(records))
    return data, images


def test_choice_metric_picks_the_most_likely_choice(chat, tmp_path):
    from chat.scoring import score_continuations
    from evaluation.evaluate import evaluate_run, load_eval_set

    data, images = _choice_set(tmp_path)
    result = evaluate_run(chat, data, images, metric="choice", batch_size=4, progress=False)
    m = result.metrics
    assert m["metric"] == "choice" and m["n"] == 4
    reasons = {p.record: p.reason for p in result.report.problems}
    assert "does not hold the reference" in reasons["bad-choices"]
    assert "no 'choices' field" in reasons["no-choices"]
    items = {it.id: it for it in load_eval_set(data, images)[0]}
    from processing_phiclip import open_image

    for row in result.rows:
        item = items[row["id"]]
        opened = [open_image(p) for p in item.images]
        scores = score_continuations(chat, [item.messages] * len(item.choices), [opened] * len(item.choices),
                                     item.choices, image_markers=True)
        best = max(range(len(scores)), key=lambda k: (scores[k].logprob, -k))
        assert row["answer"] == item.choices[best]
        assert row["correct"] == (row["answer"] in item.references)
    assert m["accuracy"] == sum(r["correct"] for r in result.rows) / 4
    # auto picks the choice metric only when every item has choices
    assert evaluate_run(chat, data, images, batch_size=4, progress=False).metrics["metric"] == "exact"


def test_write_task_writes_what_lmms_eval_reads(tmp_path):
    from evaluation.lmms_tasks import (
        doc_to_choice_index,
        doc_to_visual,
        process_yesno,
        write_task,
    )

    data, images = _choice_set(tmp_path)
    path, report = write_task(data, tmp_path / "tasks", "my_choices", images=images, metric="choice")
    config = yaml.load(path.read_text().replace("!function ", ""), Loader=yaml.SafeLoader)
    assert config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == "my_choices.jsonl"
    docs = [json.loads(line) for line in (tmp_path / "tasks" / "my_choices.jsonl").read_text().splitlines()]
    assert [d["id"] for d in docs] == ["c0", "c1", "c2"]  # the two-turn, no-choices and bad records are reported
    assert {p.record for p in report.problems} == {"bad-choices", "two-turns", "no-choices"}
    assert [doc_to_choice_index(d) for d in docs] == [0, 2, 1]
    assert doc_to_visual(docs[0])[0].size == (40, 40)
    assert process_yesno({"references": ["No"]}, ["Yes, there is."])["f1"] == ("yes", "no")
    generated, _ = write_task(data, tmp_path / "tasks", "my_open", images=images, metric="exact")
    config = yaml.load(generated.read_text().replace("!function ", ""), Loader=yaml.SafeLoader)
    assert config["output_type"] == "generate_until" and config["generation_kwargs"]["max_new_tokens"] == 32
    with pytest.raises(ValueError, match="metric 'caption' has no lmms-eval task"):
        write_task(data, tmp_path / "tasks", "captions", images=images, metric="caption")
    with pytest.raises(ValueError, match="task name"):
        write_task(data, tmp_path / "tasks", "my-task", images=images)


def test_shapes_pope_and_choice_sets(tmp_path):
    from offline.shapes import COLORS
    from offline.shapes_data import make_shapes_dataset

    ds = make_shapes_dataset(tmp_path / "shapes", 4, 5, seed=3)
    pope = json.loads(ds.eval_pope_json.read_text())
    assert len(pope) == 10 and sorted(r["conversations"][1]["value"] for r in pope) == ["No"] * 5 + ["Yes"] * 5
    choice = json.loads(ds.eval_choice_json.read_text())
    evals = {r["image"]: r["conversations"][1]["value"] for r in json.loads(ds.eval_json.read_text())
             if r["question_type"] == "color"}
    for record in choice:
        assert len(record["choices"]) == len(COLORS) and evals[record["image"]] in record["choices"]
        assert record["conversations"][1]["value"] == evals[record["image"]]
