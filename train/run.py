"""One training run, from a config to a run directory.

Run directory::

    config.yaml            the resolved config
    model/                 the trained PhiClip model, ready for from_pretrained and the Hub:
                           config, code, projector.safetensors, adapter/ (stage 2),
                           vision_tower.safetensors (only when the tower was trained), processor, card
    data_report.json       records read, kept, and every skipped one with its reason
    log_history.json       the trainer's logs; loss.png plots them
    rounds.json            one entry per training round (continued runs keep earlier ones)
    checkpoints/           trainer checkpoints, for resuming an interrupted run (a streamed run's
                           stream_state.json: each process's stream position and report)
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from data.dataset import Collator, Encoder, LlavaDataset, in_validation
from data.images import ImageResolver
from data.records import Problem, Record, Report
from data.sources import images_dir, read_records
from data.streaming import StreamingLlavaDataset, open_stream
from data.transforms import english_stopwords
from modeling_phiclip import ADAPTER_DIR, PROJECTOR_FILE, VISION_FILE
from runtime.config import RunConfig
from runtime.devices import default_device
from runtime.rundir import MODEL_DIR, model_dir
from train.build import Built, build_model
from train.checkpointing import enable_activation_checkpointing
from train.lora import attach_lora, load_lora
from train.plots import plot_losses
from train.trainer import STREAM_STATE_FILE, PhiClipTrainer
from train.weights import load_trainable


def split_records(
    records: list[Record], fraction: float, exclude_ids: set[str]
) -> tuple[list[Record], list[Record], list[Record]]:
    """Deterministic train/validation split; records whose id is in an eval set never train (the third list)."""
    train, val, excluded = [], [], []
    for record in records:
        if record.id in exclude_ids:
            excluded.append(record)
        elif in_validation(record.id, fraction):
            val.append(record)
        else:
            train.append(record)
    return train, val, excluded


def _dataset(cfg: RunConfig, built: Built, records: list[Record], report: Report) -> LlavaDataset:
    return LlavaDataset(
        records,
        processor=built.processor,
        resolver=ImageResolver(images_dir(cfg.data.train, cfg.data.images)),
        n_image_tokens=built.n_image_tokens,
        max_length=cfg.data.max_length,
        report=report,
        system_prompt=cfg.data.system_prompt,
        drop_stopwords=cfg.data.drop_stopwords,
        drop_punctuation=cfg.data.drop_punctuation,
    )


def prepare_model(cfg: RunConfig, device: torch.device | None = None) -> Built:
    """Build the model and make the right parts trainable for the configured stage."""
    use_lora = cfg.train.stage == 2 and cfg.lora.enabled
    if cfg.train.stage not in (1, 2):
        raise ValueError(f"train.stage must be 1 (projector only) or 2 (projector + LoRA), got {cfg.train.stage}")
    lora = cfg.lora if use_lora else replace(cfg.lora, quantize="none")
    built = build_model(cfg.model, lora, device, system_prompt=cfg.data.system_prompt)
    model = built.model
    previous = model_dir(Path(cfg.train.continue_from)) if cfg.train.continue_from else None
    if previous is not None and not (previous / PROJECTOR_FILE).is_file():
        raise FileNotFoundError(f"train.continue_from: {cfg.train.continue_from} is not a finished run (no projector)")
    if use_lora:
        if previous is not None and (previous / ADAPTER_DIR).is_dir():
            load_lora(model, str(previous / ADAPTER_DIR))
        else:
            attach_lora(model, cfg.lora)
    if previous is not None:
        load_trainable(model, previous, adapter=(previous / ADAPTER_DIR).is_dir())
    model.projector.requires_grad_(True)
    if cfg.train.train_vision_tower:
        model.vision_tower.requires_grad_(True)
        model.config.vision_weights = VISION_FILE
    if cfg.train.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return built


def _training_args(cfg: RunConfig, out: Path, device: torch.device, dtype: torch.dtype) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 reads a float in [0, 1) as a fraction of the steps
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        ddp_find_unused_parameters=True,  # a batch without images leaves the projector out of the backward pass
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        ignore_data_skip=cfg.data.streaming,  # a streamed run resumes from its saved stream position instead
        report_to=t.report_to,
        disable_tqdm=False,
        eval_strategy="no",
    )


def train(
    cfg: RunConfig, resume: bool = False, device: torch.device | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> Path:
    """Train as configured; returns the run directory. ``resume`` continues from the last checkpoint;
    ``callbacks`` are added to the trainer's (the throughput benchmark times steps with one)."""
    out = Path(cfg.train.output_dir)
    if not cfg.data.train:
        raise ValueError("data.train: no training data given")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise ValueError(
            f"train.warmup_ratio must be a fraction of the training steps, 0 <= ratio < 1; got {cfg.train.warmup_ratio}"
        )
    if (out / MODEL_DIR / PROJECTOR_FILE).exists() and not resume:
        raise FileExistsError(f"{out} already holds a finished run; pick another train.output_dir or use continue_from")
    if cfg.data.streaming:
        _check_streaming(cfg)
    main = _is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)
    device = device or _process_device()

    eval_ids: set[str] = set()
    if cfg.data.eval:
        eval_records, _ = read_records(cfg.data.eval)
        eval_ids = {r.id for r in eval_records}
    held_out = f"in eval set: record id also appears in {cfg.data.eval}"
    if cfg.data.streaming:
        report, train_records, val_records = Report(), [], []
    else:
        records, report = read_records(cfg.data.train, limit=cfg.data.max_records)
        train_records, val_records, leaked = split_records(records, cfg.data.val_fraction, eval_ids)
        for record in leaked:
            report.skip(record.source, record.id, held_out)

    built = prepare_model(cfg, device)
    model = built.model
    if cfg.data.streaming:
        train_set = _stream(cfg, built, report, eval_ids, held_out)
        if resume and _has_checkpoint(out):
            train_set.load_checkpoint(_saved_stream(out))
    else:
        train_set = _dataset(cfg, built, train_records, report)
        if len(train_set) == 0:
            raise ValueError(f"no usable training records in {cfg.data.train}:\n{report.summary()}")
        if main:
            print(report.summary(show=10), flush=True)
    val_set = _dataset(cfg, built, val_records, Report()) if val_records else None

    dtype = next(model.projector.parameters()).dtype
    trainer = PhiClipTrainer(
        model=model,
        args=_training_args(cfg, out, device, dtype),
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=Collator(built.tokenizer.pad_token_id),
        callbacks=callbacks,
        projector_lr=cfg.train.projector_learning_rate,
        loss_only_compute=cfg.train.loss_only_compute,
    )
    trainer.train(resume_from_checkpoint=True if resume and _has_checkpoint(out) else None)
    metrics = trainer.evaluate() if val_set is not None else {}
    if isinstance(train_set, StreamingLlavaDataset):  # each process read its own rows: one report of them all
        report = _merged(gather_object([report.to_dict()]))
        if main:
            print(report.summary(show=10), flush=True)
    else:
        for bad_images in gather_object([train_set.bad_images]):  # images other processes found unreadable
            for path, reason in bad_images.items():
                train_set.exclude_image(path, reason)

    if not trainer.is_world_process_zero():
        return out
    model.save_pretrained(out / MODEL_DIR, processor=built.processor)
    cfg.save(out / "config.yaml")
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1))
    history = trainer.state.log_history
    (out / "log_history.json").write_text(json.dumps(history, indent=1))
    plot_losses(history, out / "loss.png")
    n_train = report.n_kept if isinstance(train_set, StreamingLlavaDataset) else len(train_set)
    _append_round(out, cfg, trainer.state.global_step, n_train, metrics)
    return out


def _check_streaming(cfg: RunConfig) -> None:
    """Settings a streamed run cannot honour are refused by name."""
    if cfg.train.max_steps <= 0:
        raise ValueError("data.streaming: a stream has no known length; set train.max_steps (the number of "
                         "optimizer steps to train)")
    if cfg.train.group_by_length:
        raise ValueError("data.streaming: train.group_by_length needs every record's length up front; "
                         "set train.group_by_length=false")
    if cfg.data.val_fraction > 0:
        raise ValueError("data.streaming: data.val_fraction holds records out of a stream it never sees whole; "
                         "set it to 0 (evaluate on data.eval with phiclip eval)")


def _stream(cfg: RunConfig, built: Built, report: Report, exclude_ids: set[str], reason: str) -> StreamingLlavaDataset:
    encoder = Encoder(built.processor, ImageResolver(images_dir(cfg.data.train, cfg.data.images)),
                      built.n_image_tokens, cfg.data.max_length, cfg.data.system_prompt,
                      english_stopwords() if cfg.data.drop_stopwords else None, cfg.data.drop_punctuation)
    return open_stream(cfg.data.train, encoder, report, seed=cfg.train.seed, block_rows=cfg.data.shuffle_buffer,
                       workers=cfg.train.dataloader_workers, max_rows=cfg.data.max_records,
                       rank=int(os.environ.get("RANK", 0)), world=int(os.environ.get("WORLD_SIZE", 1)),
                       exclude_ids=exclude_ids, exclude_reason=reason)


def _saved_stream(out: Path) -> dict:
    """This process's stream state in the last checkpoint (saved by every streamed run's checkpoints)."""
    checkpoint = Path(get_last_checkpoint(str(out / "checkpoints")))
    path = checkpoint / STREAM_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {STREAM_STATE_FILE}: it was not saved by a streamed run")
    saved = json.loads(path.read_text())
    world = int(os.environ.get("WORLD_SIZE", 1))
    if len(saved) != world:
        raise ValueError(f"{path}: saved by {len(saved)} process(es); resume a streamed run with as many, not {world}")
    return saved[int(os.environ.get("RANK", 0))]


def _merged(reports: list[dict]) -> Report:
    merged = Report()
    for r in reports:
        merged.n_read += r["n_read"]
        merged.n_kept += r["n_kept"]
        merged.problems += [Problem(**p) for p in r["problems"]]
        merged.notes.update(r["notes"])
    return merged


def _process_device() -> torch.device:
    """This process's device: under ``accelerate launch`` or ``torchrun`` each process drives its local rank's GPU."""
    device = default_device()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device.type == "cuda" else device


def _is_main_process() -> bool:
    """Rank 0 of a launched group, or a lone process: the only one that writes the run directory."""
    return int(os.environ.get("RANK", 0)) == 0


def _has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("checkpoint-*"))


def _append_round(out: Path, cfg: RunConfig, steps: int, n_train: int, metrics: dict) -> None:
    rounds = []
    if cfg.train.continue_from:
        previous = Path(cfg.train.continue_from) / "rounds.json"
        if previous.is_file():
            rounds = json.loads(previous.read_text())
    rounds.append(
        {
            "round": len(rounds) + 1,
            "data": cfg.data.train,
            "train_records": n_train,
            "steps": steps,
            "continued_from": cfg.train.continue_from or None,
            "eval_loss": metrics.get("eval_loss", math.nan) if metrics else None,
        }
    )
    (out / "rounds.json").write_text(json.dumps(rounds, indent=1))

