"""Train the tiny shapes tower (:mod:`offline.tower`) from scratch, once: a finished tower with the same settings is
reused.

Training: AdamW with warmup + cosine decay over ``max_steps``, cross-entropy of one linear head per
attribute on the mean of all last-layer tokens. Images are rendered in memory from a seed stream
separate from :func:`offline.shapes_data.make_shapes_dataset`'s; a pool of ``pool_size`` fresh images
is drawn and each image is used ``reuse_per_pool`` times (the second time mirrored left-right, with the
side label swapped). Training stops at ``max_steps``, after ``max_seconds`` (data generation included),
or, if ``target_accuracy`` is set, once every attribute reaches it on a validation set (checked every
``eval_every`` steps; by default the full cosine schedule runs, which converges better than stopping early).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import SiglipVisionModel

from offline.shapes import ATTRIBUTES, QUESTION_TYPES, RENDER_VERSION
from offline.tower import (
    ARCHITECTURE,
    FORMAT_VERSION,
    TRAIN_STREAM,
    VAL_STREAM,
    Heads,
    accuracy,
    finished,
    last_layer,
    normalize,
    probe_tower,
    render_batch,
    save_tower,
    tower_config,
    tower_image_processor,
)

__all__ = ["TowerConfig", "pretrain_shapes_tower"]


@dataclass(frozen=True)
class TowerConfig:
    """How the shapes tower is shaped and trained; every field is recorded in ``probe.json``, and a cached
    tower trained with other settings is trained again."""

    seed: int = 0
    image_size: int = 64
    patch_size: int = 16
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_seconds: float = 600.0
    max_steps: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    pool_size: int = 4096
    reuse_per_pool: int = 2
    target_accuracy: float | None = None
    eval_every: int = 50
    n_val_images: int = 1000
    n_probe_images: int = 2000

    def params(self) -> dict[str, Any]:
        """The settings as ``probe.json`` records them (with the format, architecture and renderer versions)."""
        return {"version": FORMAT_VERSION, "architecture": ARCHITECTURE, "render_version": RENDER_VERSION,
                **asdict(self)}


@dataclass
class _Run:
    """What a training run records as it goes."""

    steps: int = 0
    stop_reason: str = "max_steps"
    losses: list[float] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)


def pretrain_shapes_tower(out_dir: Path, config: TowerConfig = TowerConfig(), num_threads: int | None = 2,
                          progress: bool = True) -> dict[str, Any]:
    """Pretrain a tiny SigLIP vision tower on rendered shapes and save it to ``out_dir`` (see the module docstring).

    If ``out_dir`` already holds a finished tower trained with the same settings (``probe.json``
    present), it is reused without retraining. Returns the probe dict (also written to
    ``out_dir/probe.json``): held-out ``accuracy`` per attribute (the mean-pool heads on the reloaded
    model's ``hidden_states[-1]``), ``feature_std``, ``num_tokens``, ``steps``, ``stop_reason``,
    ``train_seconds`` (wall, data generation included), ``train_cpu_seconds``, ``val_history``,
    ``losses`` (per step), ``params`` and ``reused``.
    """
    out_dir = Path(out_dir)
    params = config.params()
    done = finished(out_dir, params)
    if done is not None:
        done["reused"] = True
        return done

    with _torch_threads(num_threads):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(config.seed)
        model = SiglipVisionModel(tower_config(config.image_size, config.patch_size, config.hidden_size,
                                               config.num_hidden_layers, config.num_attention_heads)).float()
        heads = Heads(config.hidden_size)
        run = _train(model, heads, config, t0, progress)
        train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "probe.json").unlink(missing_ok=True)  # written last: marks completion
        save_tower(model, out_dir)
        tower_image_processor(config.image_size).save_pretrained(out_dir)
        heads_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
        torch.save(heads_state, out_dir / "probe_heads.pt")
        probe = probe_tower(out_dir, heads_state, seed=config.seed, n_images=config.n_probe_images)

    probe.update(steps=run.steps, stop_reason=run.stop_reason, train_seconds=round(train_seconds, 2),
                 train_cpu_seconds=round(cpu_seconds, 2), val_history=run.val_history, losses=run.losses,
                 params=params)
    tmp = out_dir / "probe.json.tmp"
    tmp.write_text(json.dumps(probe, indent=1))
    tmp.replace(out_dir / "probe.json")
    probe["reused"] = False
    return probe


def _train(model: SiglipVisionModel, heads: Heads, config: TowerConfig, t0: float, progress: bool) -> _Run:
    """The training loop: one step per batch of :func:`_batches`, validated every ``eval_every`` steps."""
    model.train()
    heads.train()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.98),
    )
    lr_at = _schedule(config)
    val_images, val_labels = render_batch(np.random.default_rng([config.seed, VAL_STREAM]), config.n_val_images,
                                          config.image_size)
    run = _Run()
    bar = tqdm(total=config.max_steps, desc="tiny tower", unit="step", disable=not progress)
    for x, y in _batches(config):
        for group in opt.param_groups:
            group["lr"] = lr_at(run.steps)
        out = heads(last_layer(model, normalize(x)))  # logits (batch, values) per attribute
        loss = sum(nn.functional.cross_entropy(logits, y[k]) for k, logits in out.items()) / len(QUESTION_TYPES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.losses.append(round(loss.item(), 5))
        run.steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{run.losses[-1]:.3f}")
        elapsed = time.perf_counter() - t0
        if run.steps % config.eval_every == 0 or run.steps == config.max_steps or elapsed >= config.max_seconds:
            acc = accuracy(model, heads, val_images, val_labels)
            worst = min(acc.values())
            run.val_history.append({"step": run.steps, "seconds": round(elapsed, 2), "worst": worst, "accuracy": acc})
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}", val_worst=f"{worst:.3f}")
            if config.target_accuracy is not None and worst >= config.target_accuracy:
                run.stop_reason = "target_accuracy"
                break
        if elapsed >= config.max_seconds:
            run.stop_reason = "max_seconds"
            break
        if run.steps >= config.max_steps:
            break
    bar.close()
    return run


def _schedule(config: TowerConfig) -> Callable[[int], float]:
    """Learning rate at a step: linear warm-up (a tenth of the steps, at most 100), then cosine down to 5%."""
    warmup = max(1, min(100, config.max_steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, config.max_steps - warmup)
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    return lr_at


def _batches(config: TowerConfig) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Training batches without end: ``(images (batch, 3, side, side) uint8, labels per attribute (batch,))``.

    Each pool of ``pool_size`` rendered images is shuffled ``reuse_per_pool`` times; every second pass
    is mirrored left-right, with the side label swapped.
    """
    rng = np.random.default_rng([config.seed, TRAIN_STREAM])
    sides = len(ATTRIBUTES["side"])
    side_flip = torch.tensor([sides - 1 - i for i in range(sides)])
    while True:
        pool_x, pool_y = render_batch(rng, config.pool_size, config.image_size)
        perm_gen = torch.Generator().manual_seed(int(rng.integers(2**31 - 1)))
        order = []
        for r in range(config.reuse_per_pool):
            perm = torch.randperm(config.pool_size, generator=perm_gen)
            order += [(r, perm[s : s + config.batch_size])
                      for s in range(0, config.pool_size - config.batch_size + 1, config.batch_size)]
        for rep, idx in order:
            x, y = pool_x[idx], {k: v[idx] for k, v in pool_y.items()}
            if rep % 2 == 1:  # mirrored copy: left <-> right
                x = x.flip(-1)
                y["side"] = side_flip[y["side"]]
            yield x, y


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
