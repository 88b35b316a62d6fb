"""Write the shapes dataset as LLaVA-Instruct JSON plus PNG files (:func:`make_shapes_dataset`), once: a finished
dataset with the same parameters is reused."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from offline.shapes import (
    COLORS,
    PAIR_QUESTIONS,
    QUESTION_TYPES,
    RENDER_VERSION,
    ShapeScene,
    answer_for,
    pair_answer,
    question_for,
    render_scene,
    sample_scene,
)


@dataclass
class ShapesDataset:
    """Paths of a dataset written by :func:`make_shapes_dataset`."""

    root: Path
    images_dir: Path
    train_json: Path
    eval_json: Path
    eval_pairs_json: Path
    eval_pope_json: Path  # yes/no questions on the eval images, POPE style: is there a shape of this color?
    eval_choice_json: Path  # the color question on each eval image with its six answers to choose from


def _pair_records(split: str, names: list[str], scenes: list[ShapeScene], n: int,
                  rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` two-image records over this split's images; one in three pairs share their color."""
    records = []
    for i in range(n):
        a = int(rng.integers(len(names)))
        same = [j for j in range(len(names)) if j != a and scenes[j].color == scenes[a].color]
        others = [j for j in range(len(names)) if scenes[j].color != scenes[a].color]
        pool = same if same and rng.random() < 1 / 3 else others
        b = int(pool[int(rng.integers(len(pool)))])
        question = PAIR_QUESTIONS[int(rng.integers(len(PAIR_QUESTIONS)))]
        records.append({
            "id": f"shapes-pair-{split}-{i:06d}",
            "image": [names[a], names[b]],
            "question_type": "two-image color",
            "conversations": [{"from": "human", "value": f"<image>\n<image>\n{question}"},
                              {"from": "gpt", "value": pair_answer(scenes[a], scenes[b])}],
        })
    return records


def _pope_records(names: list[str], scenes: list[ShapeScene], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Two yes/no questions per image, in random order: its own color (yes) and another one (no)."""
    records = []
    for name, scene in zip(names, scenes):
        other = [c for c in COLORS if c != scene.color][int(rng.integers(len(COLORS) - 1))]
        asked = [(scene.color, "Yes"), (other, "No")]
        for k in rng.permutation(2):
            color, answer = asked[int(k)]
            records.append({
                "id": f"shapes-pope-{name.removesuffix('.png')}-{color}",
                "image": name,
                "question_type": f"pope {answer.lower()}",
                "conversations": [{"from": "human", "value": f"<image>\nIs there a {color} shape in the image?"},
                                  {"from": "gpt", "value": answer}],
            })
    return records


def _choice_records(names: list[str], scenes: list[ShapeScene], rng: np.random.Generator) -> list[dict[str, Any]]:
    """The color question on each image; ``choices``: its answer written with each of the six colors."""
    records = []
    for name, scene in zip(names, scenes):
        answer = answer_for(scene, "color")
        records.append({
            "id": f"shapes-choice-{name.removesuffix('.png')}",
            "image": name,
            "question_type": "color choice",
            "choices": [answer.replace(scene.color, color) for color in COLORS],
            "conversations": [{"from": "human", "value": f"<image>\n{question_for('color', rng)}"},
                              {"from": "gpt", "value": answer}],
        })
    return records


def _with_image(question: str, rng: np.random.Generator) -> str:
    """Attach the ``<image>`` token: at the start for ~80% of records, else at the end."""
    return f"{question}\n<image>" if rng.random() < 0.2 else f"<image>\n{question}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _is_complete(root: Path, params: dict[str, Any]) -> bool:
    """True if ``root`` holds a finished dataset generated with ``params``."""
    manifest = root / "manifest.json"
    try:
        if json.loads(manifest.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    images = root / "images"
    names = [f"train-{i:06d}.png" for i in range(params["n_train_images"])]
    names += [f"eval-{i:06d}.png" for i in range(params["n_eval_images"])]
    return (
        (root / "train.json").is_file()
        and (root / "eval.json").is_file()
        and all((root / f"eval_{kind}.json").is_file() for kind in ("pairs", "pope", "choice"))
        and all((images / n).is_file() for n in names)
    )


def make_shapes_dataset(
    root: Path,
    n_train_images: int,
    n_eval_images: int,
    seed: int = 0,
    image_size: int = 64,
    n_train_pairs: int = 0,
    n_eval_pairs: int = 0,
) -> ShapesDataset:
    """Write (or reuse) the shapes dataset under ``root``.

    Creates ``root/images/{train,eval}-NNNNNN.png``, ``root/train.json``
    (one multi-turn record per train image, then ``n_train_pairs`` two-image
    records), ``root/eval.json`` (one single-turn record per eval image and
    question type), ``root/eval_pairs.json`` (``n_eval_pairs`` two-image
    records over eval images) and ``root/manifest.json``. If the manifest matches the parameters and all
    files exist, nothing is regenerated. Train and eval images come from
    separate random streams derived from ``seed``.
    """
    root = Path(root)
    images = root / "images"
    ds = ShapesDataset(root=root, images_dir=images, train_json=root / "train.json", eval_json=root / "eval.json",
                       eval_pairs_json=root / "eval_pairs.json", eval_pope_json=root / "eval_pope.json",
                       eval_choice_json=root / "eval_choice.json")
    params = {
        "version": RENDER_VERSION,
        "n_train_images": int(n_train_images),
        "n_eval_images": int(n_eval_images),
        "n_train_pairs": int(n_train_pairs),
        "n_eval_pairs": int(n_eval_pairs),
        "seed": int(seed),
        "image_size": int(image_size),
    }
    if _is_complete(root, params):
        return ds

    images.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)  # written last: marks completion

    train_records: list[dict[str, Any]] = []
    eval_records: list[dict[str, Any]] = []
    drawn: dict[str, tuple[list[str], list[ShapeScene]]] = {"train": ([], []), "eval": ([], [])}
    streams = {
        "train": (np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2]), n_train_images),
        "eval": (np.random.default_rng([seed, 3]), np.random.default_rng([seed, 4]), n_eval_images),
    }
    with tqdm(total=n_train_images + n_eval_images, desc="shapes dataset", unit="img") as bar:
        for split, (scene_rng, text_rng, n) in streams.items():
            for i in range(n):
                scene = sample_scene(scene_rng)
                name = f"{split}-{i:06d}.png"
                render_scene(scene, image_size).save(images / name)
                drawn[split][0].append(name)
                drawn[split][1].append(scene)
                if split == "train":
                    order = [QUESTION_TYPES[j] for j in text_rng.permutation(len(QUESTION_TYPES))]
                    conv: list[dict[str, str]] = []
                    for k, qt in enumerate(order):
                        q = question_for(qt, text_rng)
                        conv.append({"from": "human", "value": _with_image(q, text_rng) if k == 0 else q})
                        conv.append({"from": "gpt", "value": answer_for(scene, qt)})
                    train_records.append({"id": f"shapes-train-{i:06d}", "image": name, "conversations": conv})
                else:
                    for qt in QUESTION_TYPES:
                        q = _with_image(question_for(qt, text_rng), text_rng)
                        eval_records.append(
                            {
                                "id": f"shapes-eval-{i:06d}-{qt}",
                                "image": name,
                                "question_type": qt,
                                "conversations": [
                                    {"from": "human", "value": q},
                                    {"from": "gpt", "value": answer_for(scene, qt)},
                                ],
                            }
                        )
                bar.update(1)

    train_records += _pair_records("train", *drawn["train"], n_train_pairs, np.random.default_rng([seed, 5]))
    eval_pairs = _pair_records("eval", *drawn["eval"], n_eval_pairs, np.random.default_rng([seed, 6]))
    _write_json(ds.train_json, train_records)
    _write_json(ds.eval_json, eval_records)
    _write_json(ds.eval_pairs_json, eval_pairs)
    _write_json(ds.eval_pope_json, _pope_records(*drawn["eval"], np.random.default_rng([seed, 7])))
    _write_json(ds.eval_choice_json, _choice_records(*drawn["eval"], np.random.default_rng([seed, 8])))
    _write_json(root / "manifest.json", params)
    return ds
