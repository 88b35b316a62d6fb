"""lmms-eval scores the demo model as ``phiclip eval`` does: the ``lmms_eval`` command line, offline, in its own
locked environment (.venv-lmms, scripts/lmms_setup.sh), with the ``phiclip`` model its entry point registers.

The demo's four held-out sets become local tasks (:func:`demo.run.write_lmms_tasks`); a fifth holds what lmms-eval
must survive: an unreadable image, a question longer than the LM's context, a text-only question. Each task's score
equals ``phiclip eval``'s on the same items, and so does every generated answer and every chosen choice.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

from processing_phiclip import IMAGE_TOKEN

pytestmark = [pytest.mark.lmms, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
LMMS = ROOT / ".venv-lmms" / "bin" / "lmms-eval"
RUN = Path(os.environ.get("PHICLIP_DEMO_RUN") or ROOT / "runs" / "demo")
TASKS = {  # task -> (the ShapesDataset field of its data, phiclip eval's metric, the lmms-eval metrics it reports)
    "phiclip_shapes_open": ("eval_json", "exact", {"exact_match": "exact_match"}),
    "phiclip_shapes_two_image": ("eval_pairs_json", "exact", {"exact_match": "exact_match"}),
    "phiclip_shapes_pope": ("eval_pope_json", "yesno", {"accuracy": "accuracy", "f1": "f1", "yes_ratio": "yes_ratio"}),
    "phiclip_shapes_choice": ("eval_choice_json", "choice", {"acc": "accuracy"}),
}


@pytest.fixture(scope="module")
def lmms_env() -> Path:
    """.venv-lmms, set up from its locks (a no-op once done)."""
    subprocess.run(["bash", "scripts/lmms_setup.sh"], cwd=ROOT, check=True)
    return ROOT / ".venv-lmms" / "bin" / "python"


@pytest.fixture(scope="module")
def lmms_run(lmms_env, tmp_path_factory):
    if not (RUN / "model" / "config.json").is_file():
        pytest.skip(f"no demo run at {RUN} (make demo, or set PHICLIP_DEMO_RUN)")
    from demo.run import (
        LMMS_GROUP,
        N_EVAL_IMAGES,
        N_EVAL_PAIRS,
        N_TRAIN_IMAGES,
        N_TRAIN_PAIRS,
        SEED,
        write_lmms_tasks,
    )
    from offline.cache import cache_dir
    from offline.shapes_data import make_shapes_dataset

    root = tmp_path_factory.mktemp("lmms")
    data = make_shapes_dataset(cache_dir() / "shapes-data", N_TRAIN_IMAGES, N_EVAL_IMAGES, seed=SEED,
                               n_train_pairs=N_TRAIN_PAIRS, n_eval_pairs=N_EVAL_PAIRS)
    tasks = root / "tasks"
    write_lmms_tasks(data, tasks)
    bad = root / "bad.json"
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "shapes.png").write_bytes((data.images_dir / "eval-000000.png").read_bytes())
    bad.write_text(json.dumps([
        {"id": "unreadable", "image": "broken.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "too-long", "image": "shapes.png",
         "conversations": [{"from": "human", "value": "<image>\n" + "Describe it. " * 12000},
                           {"from": "gpt", "value": "red"}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                              {"from": "gpt", "value": "Paris"}]},
        {"id": "fine", "image": "shapes.png",
         "conversations": [{"from": "human", "value": "What color are the shapes?"},
                           {"from": "gpt", "value": "The shapes are yellow."}]},
    ]))
    from evaluation.lmms_tasks import write_task

    write_task(bad, tasks, "phiclip_awkward", images=root, metric="exact", max_new_tokens=24)
    docs = (tasks / "phiclip_awkward.jsonl").read_text().splitlines()  # "fine" as benchmarks ask: no <image> marker
    (tasks / "phiclip_awkward.jsonl").write_text("\n".join(d.replace(f'"{IMAGE_TOKEN}\\n', '"') for d in docs))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(root / "hf")}
    done = subprocess.run(
        [str(LMMS), "eval", "--model", "phiclip", "--model_args", f"pretrained={RUN}", "--tasks",
         f"{LMMS_GROUP},phiclip_awkward", "--include_path", str(tasks), "--batch_size", "16", "--output_path",
         str(root / "out"), "--log_samples"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    found = glob.glob(str(root / "out" / "**" / "*_results.json"), recursive=True)
    assert found, f"lmms-eval wrote no results under {root / 'out'}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    results = json.loads(Path(found[0]).read_text())
    samples = {}
    for name in [*TASKS, "phiclip_awkward"]:
        path = glob.glob(str(root / "out" / "**" / f"*_samples_{name}.jsonl"), recursive=True)[0]
        docs = [json.loads(line) for line in (tasks / f"{name}.jsonl").read_text().splitlines()]
        rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
        samples[name] = {docs[row["doc_id"]]["id"]: (docs[row["doc_id"]], row) for row in rows}
    return data, bad, results, samples, done.stderr


@pytest.fixture(scope="module")
def phiclip_eval(lmms_run):
    from chat.assistant import VisionChat
    from evaluation.evaluate import evaluate_run

    data, bad, *_ = lmms_run
    chat = VisionChat.load(RUN)
    out = {name: evaluate_run(chat, getattr(data, field), data.images_dir, metric=metric, batch_size=16,
                              max_new_tokens=24, progress=False) for name, (field, metric, _) in TASKS.items()}
    out["phiclip_awkward"] = evaluate_run(chat, bad, bad.parent, metric="exact", batch_size=16, max_new_tokens=24,
                                          progress=False)
    return out


@pytest.mark.parametrize("task", list(TASKS))
def test_lmms_eval_scores_equal_phiclip_eval(lmms_run, phiclip_eval, task):
    _, _, results, samples, _ = lmms_run
    ours = phiclip_eval[task]
    for lmms_key, our_key in TASKS[task][2].items():
        assert results["results"][task][f"{lmms_key},none"] == pytest.approx(ours.metrics[our_key], abs=1e-9)
    assert len(samples[task]) == ours.metrics["n"] == len(ours.rows)
    for row in ours.rows:
        doc, sample = samples[task][row["id"]]
        if task == "phiclip_shapes_choice":  # lmms-eval picks the smallest negative log-likelihood
            nll = [float(pair[0]) for pair in sample["filtered_resps"]]
            assert doc["choices"][nll.index(min(nll))] == row["answer"], row["id"]
        else:
            assert sample["filtered_resps"] == row["answer"], row["id"]


def test_lmms_eval_survives_awkward_items(lmms_run, phiclip_eval):
    _, _, results, samples, stderr = lmms_run
    awkward = {name: row for name, (_, row) in samples["phiclip_awkward"].items()}
    assert awkward["unreadable"]["filtered_resps"] == "" and awkward["too-long"]["filtered_resps"] == ""
    assert "phiclip skipped phiclip_awkward doc 0: unreadable image" in stderr
    assert "phiclip skipped phiclip_awkward doc 1:" in stderr and "over the LM's context" in stderr
    assert "(2 skipped so far)" in stderr
    ours = {row["id"]: row for row in phiclip_eval["phiclip_awkward"].rows}
    for item in ("text-only", "fine"):  # the base-LM route, and an image put first as in LLaVA's data
        assert awkward[item]["filtered_resps"] == ours[item]["answer"]
    assert ours["fine"]["answer"] == "The shapes are yellow."
    assert IMAGE_TOKEN not in awkward["fine"]["input"]
    assert results["results"]["phiclip_awkward"]["exact_match,none"] == pytest.approx(0.25)


def test_the_phiclip_model_refuses_what_it_cannot_honour(lmms_env):
    """Model arguments and generation settings PhiClip does not know fail by name, before anything is scored."""
    script = (
        "import lmms_eval.models\n"  # as lmms-eval does: its registry first, then the entry point's module
        "from evaluation.lmms_model import PhiClipLmms, settings_from\n"
        "for make in (lambda: PhiClipLmms(pretrained='x', attn='sdpa'), lambda: PhiClipLmms(pretrained='x', "
        "batch_size='auto'), lambda: settings_from({'until': ['\\n'], 'image_aspect_ratio': 'pad'}, 'mmstar'), "
        "lambda: settings_from({'num_beams': 4}, 'pope')):\n"
        "    try:\n        make()\n    except ValueError as err:\n        print('refused:', err)\n"
        "s = settings_from({'until': '\\n\\n', 'max_new_tokens': 7, 'temperature': 0.7, 'do_sample': False}, 't')\n"
        "print('settings:', s.stop, s.max_new_tokens, s.temperature)\n"
    )
    done = subprocess.run([str(lmms_env), "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line.split(": ", 1)[1] for line in done.stdout.splitlines()
             if line.startswith(("refused: ", "settings: "))]
    assert len(lines) == 5, done.stdout + done.stderr
    assert "model argument(s) not supported: attn" in lines[0]
    assert "batch_size=auto" in lines[1]
    assert "task mmstar: generation setting(s) image_aspect_ratio not supported" in lines[2]
    assert "task pope: num_beams=4" in lines[3]
    assert lines[4] == "('\\n\\n',) 7 0.0"  # do_sample false: greedy whatever the temperature


HUB_PROBE = """
import sys
import lmms_eval.models
from evaluation.lmms_model import PhiClipLmms
repo, sha, image = sys.argv[1:4]
model = PhiClipLmms(pretrained=repo, revision=sha)
print("answer:", model.chat.answer([{"role": "user", "content": "What color are the shapes?"}], image))
try:
    PhiClipLmms(pretrained=repo)
except Exception as err:
    print("main:", type(err).__name__)
"""


def test_a_hub_repo_loads_at_the_revision_asked(lmms_env, tmp_path):
    """``pretrained=OWNER/NAME,revision=SHA``: the commit asked for, not the branch head (here a broken projector)."""
    from hub_server import LocalHub, hub_env

    from chat.assistant import VisionChat
    from offline.cache import cache_dir

    if not (RUN / "model" / "config.json").is_file():
        pytest.skip(f"no demo run at {RUN} (make demo, or set PHICLIP_DEMO_RUN)")
    image = cache_dir() / "shapes-data" / "images" / "eval-000000.png"
    repo = "local-user/phiclip-lmms"
    push = ("import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\napi.create_repo(sys.argv[2], exist_ok=True)\n"
            "print(api.upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1]).oid)\n"
            "print(api.upload_file(path_or_fileobj=b'broken', path_in_repo='projector.safetensors', "
            "repo_id=sys.argv[2]).oid)\n")
    with LocalHub() as server:
        pushed = subprocess.run([str(lmms_env), "-c", push, str(RUN / "model"), repo], capture_output=True, text=True,
                                env=hub_env(server.url, tmp_path / "push"), timeout=300, check=False)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        first = pushed.stdout.split()[0]
        done = subprocess.run([str(lmms_env), "-c", HUB_PROBE, repo, first, str(image)], capture_output=True,
                              text=True, env=hub_env(server.url, tmp_path / "home"), timeout=600, check=False)
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if line.startswith(("answer: ", "main: ")))
    assert "answer" in lines, done.stdout[-2000:] + done.stderr[-4000:]
    ours = VisionChat.load(RUN).answer([{"role": "user", "content": "What color are the shapes?"}], str(image))
    assert lines["answer"] == ours
    assert "main" in lines  # the branch head's projector is not a safetensors file
