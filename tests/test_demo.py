"""The trained offline demo: its floors, held-out data, routing and CLI. Needs `make demo` first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.sources import read_records
from runtime.config import load_config

DEMO = Path(os.environ.get("PHICLIP_DEMO_RUN", Path(__file__).resolve().parents[1] / "runs" / "demo"))
pytestmark = pytest.mark.skipif(
    not (DEMO / "eval.json").is_file(), reason=f"no trained demo run at {DEMO} (run `make demo` first)"
)


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((DEMO / "eval.json").read_text())


@pytest.fixture(scope="module")
def chat():
    from chat.assistant import VisionChat

    return VisionChat.load(DEMO)


def test_held_out_floors(metrics):
    assert metrics["n"] >= 200
    assert metrics["exact_match"] >= 0.90
    assert metrics["by_type"]["color"] >= 0.90
    assert set(metrics["by_type"]) == {"color", "shape", "count", "side"}


def test_two_image_task_well_above_chance(metrics):
    """Two pictures in one question ("which color comes first, which second?"): 36 possible answers."""
    pairs = metrics["two_image"]
    assert pairs["n"] == 60 and pairs["chance"] < 0.03
    assert pairs["exact_match"] >= 0.5


def test_eval_questions_and_images_never_trained(metrics):
    cfg = load_config(DEMO / "config.yaml")
    train, _ = read_records(cfg.data.train)
    held_out, _ = read_records(metrics["data"])
    assert not {name for r in train for name in r.images} & {name for r in held_out for name in r.images}
    assert not {r.id for r in train} & {r.id for r in held_out}


def test_text_only_goes_to_the_base_model(chat):
    answer = chat.answer([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer


def new_scenes(n: int):
    """Scenes from a seed stream the dataset never uses."""
    import numpy as np

    from offline.shapes import render_scene, sample_scene

    rng = np.random.default_rng(987654)
    return [(scene, render_scene(scene)) for scene in (sample_scene(rng) for _ in range(n))]


def test_image_answers_name_the_right_color(chat):
    scenes = new_scenes(8)
    answers = [chat.answer([{"role": "user", "content": "What color is the shape?"}], image) for _, image in scenes]
    right = sum(scene.color in answer.lower() for (scene, _), answer in zip(scenes, answers))
    assert right >= 7, list(zip([s.color for s, _ in scenes], answers))


def test_chat_cli_streams_an_answer(tmp_path):
    (scene, image), = new_scenes(1)
    path = tmp_path / "scene.png"
    image.save(path)
    out = subprocess.run(
        [sys.executable, "-m", "phiclip_cli", "chat", str(DEMO), "--image", str(path), "--stream",
         "Which side are the shapes on?"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert scene.side in out.stdout.lower()


HUB_USER = """
import json, sys
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
folder, items_path, out = sys.argv[1:4]
items = json.load(open(items_path))
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
answers = []
for start in range(0, len(items), 16):
    batch = items[start:start + 16]
    inputs = processor(images=[Image.open(i["image"]) for i in batch], text=[i["question"] for i in batch],
                       return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=24)
    answers += processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
piped = []
for item in items[:12]:
    messages = [{"role": "user", "content": [{"type": "image", "image": item["image"]},
                                             {"type": "text", "text": item["question"]}]}]
    piped.append(pipe(text=messages, generate_kwargs={"max_new_tokens": 24}, return_full_text=False)[0]["generated_text"])
text = pipeline("text-generation", model=folder, trust_remote_code=True)
reply = text([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32, do_sample=False)
json.dump({"answers": answers, "pipeline": piped, "text": reply[0]["generated_text"][-1]["content"],
           "class": type(model).__name__}, open(out, "w"))
"""


def test_hub_user_loads_the_demo_folder_and_answers_held_out_questions(metrics, tmp_path):
    """A fresh Python without PhiClip: auto classes and pipelines on runs/demo/model, held-out accuracy kept."""
    from helpers import without_project

    from evaluation.metrics import exact_match

    held_out, _ = read_records(metrics["data"])
    images = load_config(DEMO / "config.yaml").data.images
    items = [{"image": str(Path(images) / r.images[0]), "question": r.turns[0].content.replace("<image>", "").strip(),
              "answer": r.turns[1].content} for r in held_out if len(r.images) == 1]
    (tmp_path / "items.json").write_text(json.dumps(items))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    root = Path(__file__).resolve().parents[1]
    script = without_project(root) + HUB_USER
    out = subprocess.run([sys.executable, "-c", script, str(DEMO / "model"), str(tmp_path / "items.json"),
                          str(tmp_path / "out.json")], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["class"] == "PhiClipForCausalLM"
    scores = [exact_match(a, [item["answer"]]) for a, item in zip(result["answers"], items)]
    assert len(scores) >= 200 and sum(scores) / len(scores) >= 0.90
    assert [a.strip() for a in result["pipeline"]] == [a.strip() for a in result["answers"][:12]]
    assert "Paris" in result["text"]


def test_demo_folder_is_hub_ready():
    from huggingface_hub import ModelCard

    folder = DEMO / "model"
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and "custom_code" in card.data.tags
    widget = card.data.widget
    assert len(widget) == 3 and all(w["output"]["text"] for w in widget)
    assert all((folder / w["src"].split("/resolve/main/")[1]).is_file() for w in widget)
    assert not (folder / "adapter_config.json").exists() and (folder / "adapter" / "adapter_config.json").is_file()
