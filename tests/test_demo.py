"""The trained offline demo: its floors, held-out data, routing and CLI. Needs `make demo` first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.config import load_config
from train.records import read_records

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


def test_eval_questions_and_images_never_trained(metrics):
    cfg = load_config(DEMO / "config.yaml")
    train, _ = read_records(cfg.data.train)
    held_out, _ = read_records(metrics["data"])
    assert not {r.image for r in train} & {r.image for r in held_out}
    assert not {r.id for r in train} & {r.id for r in held_out}


def test_text_only_goes_to_the_base_model(chat):
    answer = chat.answer([{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in answer


def new_scenes(n: int):
    """Scenes from a seed stream the dataset never uses."""
    import numpy as np

    from demo.shapes import render_scene, sample_scene

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
