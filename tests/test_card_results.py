"""Evaluation results on the model card: lmms-eval's and phiclip eval's files read, written as the Hub's
``model-index`` (parsed back by huggingface_hub) and as a table in the body; bad files refused by name.

No model and no network: the card is built from a stand-in config, and push is stopped before it loads a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import EvalResult, ModelCard

from phiclip_cli import main
from publish.card import TASK_TYPE, Example, eval_results, model_card
from publish.push import push, run_result_files
from publish.results import LMMS_EVAL, PHICLIP_EVAL, Score, read_all, read_results

CONFIG = SimpleNamespace(text_model="HuggingFaceTB/SmolLM2-135M-Instruct", vision_model="openai/clip-vit-base-patch32",
                         image_features="pooled", vision_feature_layer=-2)


def lmms_results() -> dict:
    """lmms-eval 0.7.3's results file as ``--output_path`` writes it (the keys the card reads, and a few others)."""
    return {
        "results": {
            "phiclip_shapes": {" ": " ", "alias": "phiclip_shapes"},  # a group: no metrics of its own
            "phiclip_shapes_open": {"alias": " - phiclip_shapes_open", "exact_match,none": 0.9,
                                    "exact_match_stderr,none": 0.02, "exact_match_stderr_clustered,none": "N/A"},
            "phiclip_shapes_pope": {"alias": " - phiclip_shapes_pope", "accuracy,none": 0.5,
                                    "accuracy_stderr,none": "N/A", "f1,none": 0.6666666666666666,
                                    "f1_stderr,none": "N/A", "yes_ratio,none": 1.0, "yes_ratio_stderr,none": "N/A"},
            "pope_adv": {"alias": "pope_adv", "exact_match,strict-match": 0.75, "exact_match_stderr,strict-match": 0.1},
        },
        "group_subtasks": {"phiclip_shapes": ["phiclip_shapes_open", "phiclip_shapes_pope"]},
        "configs": {
            "phiclip_shapes_open": {"task": "phiclip_shapes_open", "dataset_path": "json",
                                    "dataset_kwargs": {"data_files": {"test": "runs/demo/lmms_tasks/open.jsonl"}},
                                    "test_split": "test"},
            "phiclip_shapes_pope": {"task": "phiclip_shapes_pope", "dataset_path": "json",
                                    "dataset_kwargs": {"data_files": {"test": "runs/demo/lmms_tasks/pope.jsonl"}},
                                    "test_split": "test"},
            "pope_adv": {"task": "pope_adv", "dataset_path": "lmms-lab/POPE", "dataset_name": "Full",
                         "dataset_kwargs": {"token": True}, "test_split": "adversarial"},
        },
        "versions": {"phiclip_shapes_open": 1.0, "phiclip_shapes_pope": 1.0, "pope_adv": 2},
        "n-shot": {"phiclip_shapes_open": 0, "phiclip_shapes_pope": 0, "pope_adv": 0},
        "higher_is_better": {"phiclip_shapes_open": {"exact_match": True},
                             "phiclip_shapes_pope": {"accuracy": True, "f1": True, "yes_ratio": False}},
        "n-samples": {"phiclip_shapes_open": {"original": 240, "effective": 240},
                      "phiclip_shapes_pope": {"original": 120, "effective": 120},
                      "pope_adv": {"original": 3000, "effective": 3000}},
        "lmms_eval_version": "0.7.3",
        "date": "20261207_130952",
        "model_name": "runs/demo",
    }


def demo_eval() -> dict:
    """The demo's eval.json: phiclip eval's metrics.json plus keys of its own."""
    return {"metric": "exact", "n": 240, "exact_match": 1.0, "score": 1.0, "by_type": {"color": 1.0},
            "by_type_n": {"color": 60}, "n_skipped": 0, "data": "/data/shapes-data/eval.json", "images": "/data/images",
            "run": None, "two_image": {"data": "/data/shapes-data/eval_pairs.json", "n": 60, "exact_match": 1.0}}


def write(path: Path, content: dict | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_a_git_state_is_not_taken_for_the_lmms_eval_version(tmp_path):
    """lmms-eval 0.7 writes the branch@commit of the folder it ran in as "lmms_eval_version"."""
    path = write(tmp_path / "r_results.json", {**lmms_results(), "lmms_eval_version": "main@4d30a71"})
    assert {s.harness_version for s in read_results(path)} == {None}


def test_lmms_eval_results_give_every_task_metric_without_stderr_or_groups(tmp_path):
    path = write(tmp_path / "20261207_130952_results.json", lmms_results())
    scores = read_results(path)
    assert [(s.task, s.metric, s.value, s.n, s.task_version) for s in scores] == [
        ("phiclip_shapes_open", "exact_match", 0.9, 240, "1.0"),
        ("phiclip_shapes_pope", "accuracy", 0.5, 120, "1.0"),
        ("phiclip_shapes_pope", "f1", 0.6666666666666666, 120, "1.0"),
        ("phiclip_shapes_pope", "yes_ratio", 1.0, 120, "1.0"),
        ("pope_adv", "exact_match,strict-match", 0.75, 3000, "2"),
    ]
    assert {(s.harness, s.harness_version, s.source) for s in scores} == {(LMMS_EVAL, "0.7.3", path)}
    local, hub = scores[0], scores[-1]
    assert (local.dataset, local.dataset_config, local.dataset_split) == ("phiclip_shapes_open", None, None)
    assert (hub.dataset, hub.dataset_config, hub.dataset_split) == ("lmms-lab/POPE", "Full", "adversarial")


def test_phiclip_eval_metrics_give_the_metrics_numbers(tmp_path):
    demo = read_results(write(tmp_path / "eval.json", demo_eval()))  # its two_image is left out
    assert [(s.task, s.metric, s.value, s.n, s.dataset, s.harness, s.harness_version, s.task_version)
            for s in demo] == [("eval", "exact_match", 1.0, 240, "eval", PHICLIP_EVAL, None, None)]
    yesno = {"metric": "yesno", "n": 50, "exact_match": 0.5, "accuracy": 0.8, "f1": 0.75, "yes_ratio": 0.4,
             "precision": 0.7, "recall": 0.8, "score": 0.8, "data": "hf://lmms-lab/POPE:Full/adversarial@4d3bd06"}
    scores = read_results(write(tmp_path / "eval" / "pope" / "metrics.json", yesno))
    assert [(s.metric, s.value) for s in scores] == [("accuracy", 0.8), ("f1", 0.75), ("yes_ratio", 0.4)]
    assert {(s.task, s.dataset, s.dataset_config, s.dataset_split, s.dataset_revision) for s in scores} == {
        ("lmms-lab--POPE--Full--adversarial--4d3bd06", "lmms-lab/POPE", "Full", "adversarial", "4d3bd06")}


def test_model_index_parses_back_to_the_same_results_and_the_body_has_the_table(tmp_path):
    scores = read_all([write(tmp_path / "lmms" / "x_results.json", lmms_results()),
                       write(tmp_path / "run" / "eval.json", demo_eval())])
    card = model_card("you/phiclip-demo", CONFIG, [Example("examples/0.png", "What shape?", "a circle")],
                      "https://huggingface.co", image_tokens=1, scores=scores)
    parsed = ModelCard(str(card))
    assert "model-index:" in str(card)
    assert parsed.data.model_name == "phiclip-demo"
    assert parsed.data.eval_results == eval_results(scores)
    assert [(r.dataset_name, r.metric_type, r.metric_value) for r in parsed.data.eval_results] == [
        (s.task, s.metric, s.value) for s in scores]
    first, hub, demo = parsed.data.eval_results[0], parsed.data.eval_results[4], parsed.data.eval_results[5]
    assert isinstance(first, EvalResult) and first.task_type == TASK_TYPE
    assert first.metric_args == {"harness": "lmms-eval", "harness_version": "0.7.3", "task_version": "1.0",
                                 "n": 240}
    assert (hub.dataset_type, hub.dataset_config, hub.dataset_split) == ("lmms-lab/POPE", "Full", "adversarial")
    assert demo.metric_args == {"harness": "phiclip eval", "n": 240}
    body = parsed.text
    assert "| task | metric | value | items | harness | task version |" in body
    assert "| phiclip_shapes_pope | f1 | 0.6667 | 120 | lmms-eval 0.7.3 | 1.0 |" in body
    assert "| eval | exact_match | 1.0000 | 240 | phiclip eval | - |" in body


def test_a_card_without_results_has_neither_model_index_nor_table():
    card = str(model_card("you/x", CONFIG, [], "https://huggingface.co", image_tokens=1))
    assert "model-index" not in card and "## Evaluation" not in card and "model_name" not in card


def test_tasks_sharing_a_hub_dataset_are_filed_under_their_task_names():
    def score(task: str) -> Score:
        return Score(task=task, metric="accuracy", value=0.5, harness=LMMS_EVAL, harness_version="0.7.3",
                     task_version="1", n=10, dataset="lmms-lab/POPE", source=Path("r.json"), dataset_split="test")

    results = eval_results([score("pope"), score("pope_cot")])
    assert [(r.dataset_type, r.dataset_name) for r in results] == [("pope", "pope"), ("pope_cot", "pope_cot")]
    assert eval_results([score("pope")])[0].dataset_type == "lmms-lab/POPE"


@pytest.mark.parametrize("content, problem", [
    (None, "cannot read results"),
    ("{not json", "not JSON"),
    ({"accuracy": 0.5}, "neither lmms-eval's results"),
    ({"results": {"t": {"acc,none": "N/A"}}, "versions": {}}, "not a number"),
    ({"results": {"t": {"alias": "t"}}, "versions": {}}, "without any metric"),
    ({"results": {"t": {"acc,none": 0.5}}, "versions": {}, "n-samples": {"t": {"effective": -1}}}, "not a count"),
    ({"metric": "bleu", "n": 3, "data": "x.json"}, "metric 'bleu'"),
    ({"metric": "yesno", "n": 3, "accuracy": 0.5, "data": "x.json"}, "'f1' is None"),
    ({"metric": "exact", "n": 3, "exact_match": 1.0}, "need 'data'"),
])
def test_a_bad_results_file_is_refused_by_name(tmp_path, content, problem):
    path = tmp_path / "broken_results.json"
    if content is not None:
        write(path, content)
    with pytest.raises(ValueError, match=problem) as err:
        read_all([path])
    assert str(path) in str(err.value)


def test_one_number_in_two_files_is_refused_and_one_file_twice_is_read_once(tmp_path):
    a = write(tmp_path / "a" / "metrics.json", demo_eval())
    b = write(tmp_path / "b" / "metrics.json", demo_eval())
    assert len(read_all([a, tmp_path / "a" / ".." / "a" / "metrics.json"])) == 1
    with pytest.raises(ValueError, match="in both .*a/metrics.json and .*b/metrics.json"):
        read_all([a, b])


def test_a_runs_own_results_are_its_eval_json_or_metrics_json_and_eval_folders(tmp_path):
    run = tmp_path / "run"
    assert run_result_files(run) == [] and run_result_files("you/some-repo") == []
    metrics = write(run / "metrics.json", demo_eval())
    folders = [write(run / "eval" / name / "metrics.json", demo_eval()) for name in ("vqa", "pope")]
    assert run_result_files(run) == [metrics, *sorted(folders)]
    demo = write(run / "eval.json", demo_eval())  # the demo's superset of metrics.json
    assert run_result_files(run) == [demo, *sorted(folders)]


def test_push_refuses_a_bad_results_file_before_loading_the_model(tmp_path, capsys):
    run = tmp_path / "run"
    bad = write(run / "eval" / "broken" / "metrics.json", "{")
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        push(run, "you/x")
    missing = tmp_path / "missing.json"
    assert main(["push", str(run), "you/x", "--no-run-results", "--results", str(missing)]) == 2
    assert f"phiclip push: error: {missing}: cannot read results" in capsys.readouterr().err


def test_results_do_not_go_with_a_gguf_push(tmp_path):
    with pytest.raises(SystemExit, match="not --gguf"):
        main(["push", str(tmp_path), "you/x", "--gguf", "--results", "r.json"])
