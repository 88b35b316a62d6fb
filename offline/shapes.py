"""Deterministic synthetic "shapes" scenes for the offline demo: sampling, rendering, questions and answers.

Every image shows 1-3 shapes of one kind and one color, all in the left half
or all in the right half of a light, slightly noisy background. Each shape sits
in its own cell of a 4x4 grid, with a random size and a random position inside
the cell (so shapes never overlap, and at 64 px a patch-16 vision tower sees
each shape in one patch). The dataset is written as
LLaVA-Instruct JSON plus PNG files so it goes through the same reader as real
data (:mod:`offline.shapes_data` writes it):

* ``train.json``: one record per train image, all four question types packed
  as one multi-turn conversation in a seeded random order;
* ``eval.json``: one single-turn record per (eval image, question type), with
  an extra ``"question_type"`` field;
* two-image records (LLaVA-OneVision's layout: ``"image": [a, b]`` and one
  ``<image>`` per image) asking which color each picture shows: some in
  ``train.json``, the held-out ones in ``eval_pairs.json`` (eval images only).

Scenes are size independent (positions and sizes are fractions of the image
side), so :func:`render_scene` can draw the same scene at any resolution. The
same sampler/renderer is used to pretrain the tiny vision tower
(:mod:`offline.tower_training`) on images generated in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ATTRIBUTES",
    "COLORS",
    "COLOR_RGB",
    "COUNTS",
    "GRID",
    "QUESTION_TEMPLATES",
    "QUESTION_TYPES",
    "RENDER_VERSION",
    "SHAPES",
    "SIDES",
    "ShapeScene",
    "PAIR_QUESTIONS",
    "answer_for",
    "pair_answer",
    "question_for",
    "render_scene",
    "sample_scene",
    "scene_labels",
]

QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "side")
"""Question types; also the attribute names returned by :func:`scene_labels`."""

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
"""Named colors, well separated in RGB."""

COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 220),
    "yellow": (235, 200, 15),
    "purple": (135, 45, 175),
    "orange": (245, 125, 20),
}
"""Nominal fill color of each named color (jittered per scene)."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
"""Shape kinds (all render distinctly at 64x64)."""

COUNTS: tuple[int, ...] = (1, 2, 3)
"""Possible number of shapes in an image."""

SIDES: tuple[str, ...] = ("left", "right")
"""Half of the image that holds all shapes."""

GRID = 4
"""Shapes are placed in a ``GRID`` x ``GRID`` grid of cells, at most one shape per cell."""

ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": COUNTS,
    "side": SIDES,
}
"""Attribute name -> tuple of values (class index = position in the tuple)."""

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": (
        "What color is the shape?",
        "Which color are the objects?",
        "What color are the shapes in the image?",
        "What is the color of the shapes?",
        "Tell me the color of the objects in the picture.",
        "Which color do the shapes have?",
    ),
    "shape": (
        "What shape is shown?",
        "Which kind of shape is in the image?",
        "What are the objects in the picture?",
        "What shape do the objects have?",
        "Name the shape in the image.",
        "What kind of objects are shown?",
    ),
    "count": (
        "How many shapes are there?",
        "How many objects are in the image?",
        "Count the shapes in the picture.",
        "What is the number of shapes?",
        "How many shapes can you see?",
        "How many objects does the image show?",
    ),
    "side": (
        "On which side are the shapes?",
        "Are the objects on the left or on the right?",
        "Which half of the image holds the shapes?",
        "Where are the shapes, left or right?",
        "On what side of the picture are the objects?",
        "Which side are the shapes on?",
    ),
}
"""Question paraphrases per question type."""

PAIR_QUESTIONS: tuple[str, ...] = (
    "Compare the two pictures: which color comes first, which second?",
    "Name the color of the first picture and of the second picture.",
    "Which colors do the two pictures show, in order?",
    "Look at both pictures. What color is in each, first then second?",
)
"""Paraphrases of the two-image question (worded apart from the one-image color questions)."""

RENDER_VERSION = 3
"""Bumped whenever sampling/rendering/text changes, so cached datasets and towers are rebuilt."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled (anti-aliasing)


@dataclass(frozen=True)
class ShapeScene:
    """One synthetic scene.

    Attributes:
        color: Named color (one of :data:`COLORS`).
        shape: Shape kind (one of :data:`SHAPES`).
        count: Number of shapes (one of :data:`COUNTS`).
        side: ``"left"`` or ``"right"``; every shape lies fully in that half.
        centers: ``(x, y)`` centre of each shape as a fraction of the image side.
        sizes: Size (bounding diameter) of each shape as a fraction of the side.
        rgb: Actual (jittered) fill color.
        background: Background color.
        noise_seed: Seed of the per-pixel noise added by :func:`render_scene`.
    """

    color: str
    shape: str
    count: int
    side: str
    centers: tuple[tuple[float, float], ...]
    sizes: tuple[float, ...]
    rgb: tuple[int, int, int]
    background: tuple[int, int, int]
    noise_seed: int


def _place(rng: np.random.Generator, count: int, side: str) -> tuple[list[tuple[float, float]], list[float]]:
    """Sample centres/sizes (fractions of the image side) inside one half of the image.

    Each shape gets its own cell of a :data:`GRID` x :data:`GRID` grid (among
    the cells of its half) and a random size and position inside that cell,
    with at least ~1 px (at 64 px) of margin. Shapes therefore never overlap
    or touch, and at 64 px with a patch-16 vision tower each shape lies in a
    single patch, which makes shape and count much easier to learn for a tiny
    tower trained from scratch.
    """
    cell = 1.0 / GRID
    half_cols = GRID // 2
    cells = rng.choice(half_cols * GRID, size=count, replace=False)
    margin = 1.0 / 64
    centers: list[tuple[float, float]] = []
    sizes: list[float] = []
    for c in cells:
        col = int(c) % half_cols + (half_cols if side == "right" else 0)
        row = int(c) // half_cols
        size = float(rng.uniform(10.0, 14.0) / 64)
        lo, hi = margin + size / 2, cell - margin - size / 2
        centers.append((col * cell + float(rng.uniform(lo, hi)), row * cell + float(rng.uniform(lo, hi))))
        sizes.append(size)
    return centers, sizes


def sample_scene(rng: np.random.Generator) -> ShapeScene:
    """Sample a random scene from ``rng`` (a ``numpy.random.Generator``).

    Attributes are uniform; sizes, positions, exact colors, background tint and
    noise are randomised. The result depends only on the generator's state.
    """
    color = COLORS[int(rng.integers(len(COLORS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    count = COUNTS[int(rng.integers(len(COUNTS)))]
    side = SIDES[int(rng.integers(len(SIDES)))]
    centers, sizes = _place(rng, count, side)
    base = COLOR_RGB[color]
    rgb = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in base)
    bg_level = int(rng.integers(228, 256))
    background = tuple(int(np.clip(bg_level - rng.integers(0, 10), 0, 255)) for _ in range(3))
    return ShapeScene(
        color=color,
        shape=shape,
        count=count,
        side=side,
        centers=tuple(centers),
        sizes=tuple(sizes),
        rgb=rgb,  # type: ignore[arg-type]
        background=background,  # type: ignore[arg-type]
        noise_seed=int(rng.integers(2**31 - 1)),
    )


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill: tuple[int, int, int]
) -> None:
    """Draw one shape of bounding diameter ``size`` (pixels) centred at ``(cx, cy)``."""
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        h = r * 0.82
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        # upright equilateral triangle, slightly enlarged and lowered to fill the bounding circle
        t = r * 1.05  # corners stay within ~1.11 r of the centre (placement keeps 2 px clearance)
        pts = [
            (cx + t * math.cos(a), cy + 0.1 * t + t * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
        draw.polygon(pts, fill=fill)
    elif shape == "cross":
        w = r * 0.36
        h = r * 0.95
        draw.rectangle([cx - w, cy - h, cx + w, cy + h], fill=fill)
        draw.rectangle([cx - h, cy - w, cx + h, cy + w], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: ShapeScene, image_size: int = 64) -> Image.Image:
    """Render ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels.

    Deterministic: the same scene always gives the same pixels.
    """
    big = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(img)
    for (fx, fy), fs in zip(scene.centers, scene.sizes):
        _draw_shape(draw, scene.shape, fx * big, fy * big, fs * big, scene.rgb)
    img = img.reduce(_SUPERSAMPLE)  # box filter
    noise = np.random.default_rng(scene.noise_seed).standard_normal(size=(image_size, image_size, 3), dtype=np.float32)
    arr = np.asarray(img, dtype=np.float32) + 3.0 * noise
    arr = np.clip(arr, 0, 255).round().astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def scene_labels(scene: ShapeScene) -> dict[str, int]:
    """Class index of each attribute (keys = :data:`QUESTION_TYPES`)."""
    return {
        "color": COLORS.index(scene.color),
        "shape": SHAPES.index(scene.shape),
        "count": COUNTS.index(scene.count),
        "side": SIDES.index(scene.side),
    }


def question_for(question_type: str, rng: np.random.Generator) -> str:
    """Pick a random paraphrase of ``question_type``."""
    templates = QUESTION_TEMPLATES[question_type]
    return templates[int(rng.integers(len(templates)))]


def answer_for(scene: ShapeScene, question_type: str) -> str:
    """Short deterministic answer to ``question_type`` about ``scene``."""
    one = scene.count == 1
    if question_type == "color":
        return f"The shape is {scene.color}." if one else f"The shapes are {scene.color}."
    if question_type == "shape":
        return f"It is a {scene.shape}." if one else f"They are {_PLURAL[scene.shape]}."
    if question_type == "count":
        return "There is 1 shape." if one else f"There are {scene.count} shapes."
    if question_type == "side":
        return f"It is on the {scene.side}." if one else f"They are on the {scene.side}."
    raise ValueError(f"unknown question type {question_type!r}")


def pair_answer(first: ShapeScene, second: ShapeScene) -> str:
    """Answer to the two-image question: the first picture's color, then the second's."""
    return f"First {first.color}, second {second.color}."
