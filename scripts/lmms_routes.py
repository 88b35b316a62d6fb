"""The same lmms-eval tasks through three routes to one trained run, scores side by side (the README's table).

1. ``--model phiclip``: PhiClip's own model (the ``lmms_eval.models`` entry point), text-only questions on the base
   LM with the adapter off;
2. ``--model llava_hf --force_simple`` on the run's Llava export (``phiclip export --format llava``: the adapter
   merged into the LM, so text-only questions get the fine-tuned LM too);
3. ``--model openai`` against ``phiclip serve`` (the OpenAI-compatible API, started and stopped here).

The tasks are the demo's held-out sets written without ``<image>`` markers (images first, as benchmarks ask), plus
a few text-only questions. Run after ``make demo``, with .venv-lmms set up (``bash scripts/lmms_setup.sh``):

    .venv/bin/python scripts/lmms_routes.py [RUN] [--out runs/lmms-routes]

Prints a markdown table: each task's score per route, and how many answers equal the phiclip route's.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo.run import N_EVAL_IMAGES, N_EVAL_PAIRS, N_TRAIN_IMAGES, N_TRAIN_PAIRS, SEED  # noqa: E402
from evaluation.lmms_tasks import write_task  # noqa: E402
from offline.cache import cache_dir  # noqa: E402
from offline.shapes_data import make_shapes_dataset  # noqa: E402

TEXT_QUESTIONS = [("What is the capital of France?", "Paris"), ("How many legs does a spider have?", "8"),
                  ("What do bees make?", "Honey"), ("Which planet is known as the red planet?", "Mars"),
                  ("What is 2 plus 3?", "5"), ("What is frozen water called?", "Ice")]
TASKS = {"plain_open": "exact_match", "plain_two_image": "exact_match", "plain_pope": "accuracy",
         "plain_choice": "acc", "plain_text": "exact_match"}
LMMS = ROOT / ".venv-lmms" / "bin" / "lmms-eval"


def write_tasks(out: Path) -> None:
    data = make_shapes_dataset(cache_dir() / "shapes-data", N_TRAIN_IMAGES, N_EVAL_IMAGES, seed=SEED,
                               n_train_pairs=N_TRAIN_PAIRS, n_eval_pairs=N_EVAL_PAIRS)
    text = out / "text.json"
    text.write_text(json.dumps([{"id": f"text-{i}", "conversations": [{"from": "human", "value": q},
                                                                     {"from": "gpt", "value": a}]}
                                for i, (q, a) in enumerate(TEXT_QUESTIONS)]))
    sets = {"plain_open": (data.eval_json, "exact"), "plain_two_image": (data.eval_pairs_json, "exact"),
            "plain_pope": (data.eval_pope_json, "yesno"), "plain_choice": (data.eval_choice_json, "choice"),
            "plain_text": (text, "exact")}
    for name, (path, metric) in sets.items():
        write_task(path, out / "tasks", name, images=data.images_dir, metric=metric, max_new_tokens=24,
                   image_markers=False)


def lmms_eval(route: str, args: list[str], tasks: list[str], out: Path) -> dict:
    """Run lmms-eval; returns {task: (score, {doc_id: answer})}."""
    started = time.time()
    cmd = [str(LMMS), "eval", *args, "--tasks", ",".join(tasks), "--include_path", str(out / "tasks"),
           "--output_path", str(out / route), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with open(out / f"{route}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    results = json.loads(Path(glob.glob(str(out / route / "**" / "*_results.json"), recursive=True)[-1]).read_text())
    found = {}
    for task in tasks:
        samples = glob.glob(str(out / route / "**" / f"*_samples_{task}.jsonl"), recursive=True)[-1]
        answers = {}
        for line in Path(samples).read_text().splitlines():
            row = json.loads(line)
            answers[row["doc_id"]] = row["filtered_resps"] if isinstance(row["filtered_resps"], str) else row.get("acc")
        found[task] = (results["results"][task][f"{TASKS[task]},none"], answers)
    print(f"{route}: {time.time() - started:.0f} s", flush=True)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", nargs="?", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "lmms-routes"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tasks(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    phiclip = ROOT / ".venv" / "bin" / "phiclip"
    subprocess.run([str(phiclip), "export", args.run, str(out / "llava"), "--format", "llava", "--overwrite"],
                   check=True, env=env, capture_output=True)
    routes = {"phiclip": lmms_eval("phiclip", ["--model", "phiclip", "--model_args", f"pretrained={args.run}",
                                               "--batch_size", "16"], list(TASKS), out)}
    generated = [t for t in TASKS if t != "plain_choice"]  # llava_hf's loglikelihood fails; the API has none
    routes["llava_hf"] = lmms_eval("llava_hf", ["--model", "llava_hf", "--force_simple", "--model_args",
                                                f"pretrained={out / 'llava'},dtype=float32,device_map=cpu",
                                                "--device", "cpu", "--batch_size", "1"], generated, out)
    port = free_port()
    api = f"model_version=phiclip-run,base_url=http://127.0.0.1:{port}/v1,api_key=none,num_concurrent=16,timeout=120"
    with open(out / "serve.log", "w") as log:
        server = subprocess.Popen([str(phiclip), "serve", args.run, "--port", str(port), "--no-ui", "--max-batch",
                                   "16", "--model-name", "phiclip-run"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    time.sleep(1)
            routes["openai"] = lmms_eval("openai", ["--model", "openai", "--force_simple", "--model_args", api],
                                         generated, out)
        finally:
            server.terminate()
            server.wait(timeout=60)
    print("\n| task | metric | phiclip | llava_hf (Llava export) | openai (phiclip serve) |")
    print("|---|---|---|---|---|")
    ours = routes["phiclip"]
    for task, metric in TASKS.items():
        cells = [f"{ours[task][0]:.3f}"]
        for route in ("llava_hf", "openai"):
            if task not in routes[route]:
                cells.append("not run")
                continue
            score, answers = routes[route][task]
            same = sum(answers[k] == ours[task][1][k] for k in answers)
            cells.append(f"{score:.3f} ({same}/{len(answers)} answers equal)")
        print(f"| {task} | {metric} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
