"""Export a run directory as a standard Hugging Face Llava checkpoint.

The LoRA adapter is merged into the language model, and the result is written as a
``LlavaForConditionalGeneration`` folder (config, safetensors, processor with chat
template, generation config) that loads with ``from_pretrained`` alone, without phiclip.

Weight names follow the layout transformers has used since 4.52 (and vLLM maps):
``model.language_model.*``, ``model.vision_tower.vision_model.*``,
``model.multi_modal_projector.*`` and ``lm_head.weight`` (left out when tied to the input
embeddings). transformers 5 keeps CLIP/SigLIP towers without their ``vision_model``
level in memory and its own ``save_pretrained`` writes ``vision_tower.embeddings.*``,
which vLLM's CLIP loader does not accept, so the names are written here explicitly.

A QLoRA run (``lora.quantize: nf4``) is exported by rebuilding the base model in full
precision, loading the adapter and projector, and merging: the checkpoint holds the
original (unquantised) base weights plus the LoRA update, not the NF4 rounding the
adapter was trained against.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, LlavaProcessor

from train.config import RunConfig, load_config
from export.template import wrap_chat_template
from demo import offline
from train.build import IMAGE_TOKEN, build_model
from train.weights import ADAPTER_DIR, TOWER_FILE, load_trainable

PROCESSOR_DIR = "processor"  # the run directory's tokenizer + image processor (train.run)
SHARD_BYTES = 4 * 1024**3
INFO_FILE = "phiclip_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TOWER = "model.vision_tower."
_TOWER_INNER = "vision_model."


class ExportError(ValueError):
    """The run cannot be written as a standard Llava checkpoint; the message says why."""


def check_exportable(cfg: RunConfig) -> None:
    """Refuse configurations that a plain ``LlavaForConditionalGeneration`` cannot represent."""
    if cfg.model.image_features != "patches":
        raise ExportError(
            f"model.image_features is '{cfg.model.image_features}': this run feeds the LM a pooled CLIP image "
            "embedding, which a standard Llava checkpoint (transformers, vLLM, lmms-eval) has no way to express. "
            "Only runs with model.image_features: patches can be exported."
        )
    if cfg.model.vision_feature_select_strategy not in ("default", "full"):
        raise ExportError(
            f"model.vision_feature_select_strategy '{cfg.model.vision_feature_select_strategy}' "
            "is not one of default, full"
        )


def _target_dtype(name: str, cfg: RunConfig) -> torch.dtype:
    """``auto``: the run's configured dtype, else the dtype the LM's own checkpoint is stored in."""
    if name != "auto":
        if name not in _DTYPES:
            raise ExportError(f"dtype '{name}' is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if cfg.model.dtype != "auto":
        return _DTYPES.get(cfg.model.dtype, torch.float32)
    try:
        stored = getattr(AutoConfig.from_pretrained(offline.resolve(cfg.model.lm)), "dtype", None)
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, str):
        stored = _DTYPES.get(stored)
    return stored if stored in _DTYPES.values() else torch.float32


def load_merged(run_dir: Path, cfg: RunConfig, dtype: torch.dtype, device: torch.device):
    """The run's Llava model with its adapter merged in (built in ``dtype`` on ``device``)."""
    name = next(k for k, v in _DTYPES.items() if v == dtype)
    built = build_model(replace(cfg.model, dtype=name), replace(cfg.lora, quantize="none"), device)
    model: torch.nn.Module = built.model
    merged_adapter = (run_dir / ADAPTER_DIR).is_dir()
    if merged_adapter:
        model = PeftModel.from_pretrained(model, str(run_dir / ADAPTER_DIR))
    load_trainable(model, run_dir)
    if merged_adapter:
        model = model.merge_and_unload()
    return model.eval(), built.n_image_tokens, merged_adapter


def _tied(model) -> bool:
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return bool(getattr(model.config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))


def checkpoint_state(model) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors under the names written to disk, and whether ``lm_head`` stays tied to the embeddings."""
    state = model.state_dict()
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = _tied(model) and head is not None and (
        head.weight.data_ptr() == embed.data_ptr() or torch.equal(head.weight, embed)
    )
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue
        name = key
        if key.startswith(_TOWER) and not key[len(_TOWER):].startswith(_TOWER_INNER):
            name = _TOWER + _TOWER_INNER + key[len(_TOWER):]
        out[name] = tensor.detach().to("cpu").contiguous()
    # safetensors refuses tensors that share memory; give any remaining alias its own copy.
    seen: set[int] = set()
    for name, tensor in out.items():
        if tensor.data_ptr() in seen:
            out[name] = tensor.clone()
        seen.add(out[name].data_ptr())
    return out, tied


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int = SHARD_BYTES) -> list[str]:
    """``model.safetensors``, or numbered shards plus ``model.safetensors.index.json`` when large."""
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key in sorted(tensors):
        if shards[-1] and used + sizes[key] > shard_bytes:
            shards.append({})
            used = 0
        shards[-1][key] = tensors[key]
        used += sizes[key]
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        names.append(name)
        weight_map.update({k: name for k in shard})
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


def make_processor(tokenizer, image_processor, vision_config, strategy: str, n_image_tokens: int,
                   system_prompt: str | None = None) -> LlavaProcessor:
    """A ``LlavaProcessor`` whose ``<image>`` expansion gives exactly ``n_image_tokens`` tokens.

    Its chat template (also set on the tokenizer) is the LM's own, wrapped to accept
    content-part lists (:func:`export.template.wrap_chat_template`).
    """
    patch = int(vision_config.patch_size)
    side = int(getattr(vision_config, "image_size", 224))
    pixels = image_processor(images=Image.new("RGB", (side, side)), return_tensors="pt")["pixel_values"]
    height, width = pixels.shape[-2:]
    grid = (height // patch) * (width // patch)
    # LlavaProcessor counts grid + num_additional_image_tokens, minus one for the "default" strategy.
    additional = n_image_tokens - grid + (1 if strategy == "default" else 0)
    if additional < 0:
        raise ExportError(
            f"the tower yields {n_image_tokens} image tokens for a {height}x{width} image with patch size {patch}; "
            "LlavaProcessor cannot express that count"
        )
    tokenizer.chat_template = wrap_chat_template(tokenizer.chat_template, system_prompt)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy=strategy,
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=additional,
    )
    probe = processor(images=[Image.new("RGB", (side, side))], text=IMAGE_TOKEN, return_tensors="pt")
    counted = int((probe["input_ids"] == processor.image_token_id).sum())
    if counted != n_image_tokens:
        raise ExportError(f"processor expands <image> to {counted} tokens, the model expects {n_image_tokens}")
    return processor


def build_processor(run_dir: Path, cfg: RunConfig, vision_config, n_image_tokens: int) -> LlavaProcessor:
    """The run's tokenizer and image processor as a ``LlavaProcessor`` (see :func:`make_processor`)."""
    tokenizer = AutoTokenizer.from_pretrained(run_dir / PROCESSOR_DIR)
    image_processor = AutoImageProcessor.from_pretrained(run_dir / PROCESSOR_DIR)
    return make_processor(tokenizer, image_processor, vision_config, cfg.model.vision_feature_select_strategy,
                          n_image_tokens, cfg.data.system_prompt)


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    device: torch.device | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Merge the run's adapter and write a standard Llava checkpoint to ``out``; returns ``out``.

    ``dtype``: ``auto`` (the run's configured dtype, else the LM checkpoint's own dtype),
    ``float32``, ``bfloat16`` or ``float16``. With ``auto`` the merge itself is done in
    float32 and the result cast afterwards.
    """
    run = Path(run_dir)
    out = Path(out)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run} is not a phiclip run directory (no config.yaml)")
    if not (run / PROCESSOR_DIR).is_dir():
        raise FileNotFoundError(f"{run / PROCESSOR_DIR} missing: the run did not finish")
    cfg = load_config(run / "config.yaml")
    check_exportable(cfg)
    if out.resolve() == run.resolve() or run.resolve() in out.resolve().parents:
        raise ExportError(f"export folder {out} must lie outside the run directory {run}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    target = _target_dtype(dtype, cfg)
    device = device or torch.device("cpu")

    model, n_image_tokens, merged_adapter = load_merged(run, cfg, torch.float32 if dtype == "auto" else target, device)
    model = model.to(target)
    processor = build_processor(run, cfg, model.config.vision_config, n_image_tokens)
    tensors, tied = checkpoint_state(model)

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    files = write_safetensors(tensors, tmp, shard_bytes)
    config = model.config
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = target
    config.get_text_config().dtype = target
    config.image_seq_length = n_image_tokens
    config.use_cache = True
    if not tied:
        config.tie_word_embeddings = False
        config.get_text_config().tie_word_embeddings = False
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    # Also the classic preprocessor_config.json, for loaders that read the image processor alone.
    processor.image_processor.save_pretrained(tmp)
    for file in files:
        os.chmod(tmp / file, 0o644)
    info = {
        "source_run": str(run.resolve()),
        "lm": cfg.model.lm,
        "vision": cfg.model.vision,
        "dtype": str(target).removeprefix("torch."),
        "n_image_tokens": n_image_tokens,
        "lora_merged": merged_adapter,
        "base_dequantized_from": "nf4" if merged_adapter and cfg.lora.quantize == "nf4" else None,
        "vision_tower_trained": (run / TOWER_FILE).is_file(),
        "tied_embeddings": tied,
        "weights": files,
        "note": (
            "phiclip chat answers text-only questions with the adapter disabled; this merged checkpoint "
            "always applies it."
        ),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
