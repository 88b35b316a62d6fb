"""Export a PhiClip model as a standard Hugging Face Llava checkpoint (for vLLM, lmms-eval, plain transformers).

The LoRA adapter is merged into the language model, and the result is written as a
``LlavaForConditionalGeneration`` folder (config, safetensors, processor with chat
template, generation config) that loads with ``from_pretrained`` alone, without PhiClip.

Weight names follow the layout transformers has used since 4.52 (and vLLM maps):
``model.language_model.*``, ``model.vision_tower.vision_model.*``,
``model.multi_modal_projector.*`` and ``lm_head.weight`` (left out when tied to the input
embeddings). transformers 5 keeps CLIP/SigLIP towers without their ``vision_model``
level in memory and its own ``save_pretrained`` writes ``vision_tower.embeddings.*``,
which vLLM's CLIP loader does not accept, so the names are written here explicitly.

A QLoRA run is exported in full precision: PhiClip loads its base LM by name, unquantised,
and merges the adapter into it, so the checkpoint holds the original base weights plus the
LoRA update, not the NF4 rounding the adapter was trained against.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaImageProcessorPil, LlavaProcessor

from chat.assistant import load_parts, locate
from configuration_phiclip import PhiClipConfig
from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import IMAGE_TOKEN, PhiClipProcessor

SHARD_BYTES = 4 * 1024**3
INFO_FILE = "phiclip_export.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_TOWER = "model.vision_tower."
_TOWER_INNER = "vision_model."


class ExportError(ValueError):
    """The run cannot be written as a standard Llava checkpoint; the message says why."""


# Settings an LM's own causal-LM head applies to its logits (Gemma-2's soft-capping, Cohere's and Granite's scales),
# and the value at which it does nothing. LlavaForConditionalGeneration puts a plain lm_head on the LM's hidden states.
_HEAD_SETTINGS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def check_exportable(config) -> None:
    """Refuse models that a plain ``LlavaForConditionalGeneration`` cannot represent; raises ``ExportError``."""
    if config.image_features != "patches":
        raise ExportError(
            f"image_features is '{config.image_features}': this model feeds the LM a pooled CLIP image "
            "embedding, which a standard Llava checkpoint (transformers, vLLM, lmms-eval) has no way to express. "
            "Only models with image_features 'patches' can be exported."
        )
    text = config.text_config
    for name, neutral in _HEAD_SETTINGS.items():
        value = getattr(text, name, neutral)
        if value != neutral:
            raise ExportError(
                f"the LM ({text.model_type}) sets {name}={value}: its own head applies that to the logits and "
                "LlavaForConditionalGeneration's head does not, so a Llava checkpoint would answer differently. "
                "Share the PhiClip folder (Hub files) or export to GGUF instead."
            )


def _target_dtype(name: str, model: PhiClipForCausalLM) -> torch.dtype:
    """``auto``: the dtype the LM's own checkpoint is stored in, read from its ``config.json``
    (``config.text_model``); where that cannot be read, the dtype PhiClip's config records for the LM
    (the one it was trained in: float32 after a CPU run); float32 when neither says."""
    if name != "auto":
        if name not in _DTYPES:
            raise ExportError(f"dtype '{name}' is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    for config in (_checkpoint_config(model.config), model.config.text_config):
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(stored, str):
            stored = _DTYPES.get(stored.removeprefix("torch."))
        if stored in _DTYPES.values():
            return stored
    return torch.float32


def _checkpoint_config(config):
    """The LM's own config (by name or path, at the recorded revision), or None where it cannot be read."""
    try:
        return AutoConfig.from_pretrained(config.text_model, revision=getattr(config, "text_revision", None))
    except (OSError, ValueError):
        return None


def _negative_layers(layer: int | list[int], n_layers: int) -> int | list[int]:
    """Count layers from the end: Llava asks the tower for hidden states only when the index is truthy,
    so layer 0 (the embeddings) must be spelled ``-(n_layers + 1)``."""
    if isinstance(layer, int):
        return layer - (n_layers + 1) if layer >= 0 else layer
    return [_negative_layers(one, n_layers) for one in layer]


def _fit_embeddings(lm: torch.nn.Module, n_tokens: int) -> None:
    """Give ``<image>`` an embedding row (Llava checkpoints keep it in the vocabulary): new rows are the mean row."""
    old = lm.get_input_embeddings().weight.shape[0]
    if n_tokens <= old:
        return
    lm.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        weight = lm.get_input_embeddings().weight
        weight[old:] = weight[:old].mean(0, keepdim=True)
        head = lm.get_output_embeddings()
        if head is not None and head.weight is not weight:
            head.weight[old:] = head.weight[:old].mean(0, keepdim=True)


def to_llava(model: PhiClipForCausalLM) -> LlavaForConditionalGeneration:
    """The same weights (adapter already merged) in a ``LlavaForConditionalGeneration``."""
    check_exportable(model.config)
    if model.has_adapter:
        raise ExportError("merge the LoRA adapter first (from_pretrained(..., merge_adapter=True))")
    lm = model.language_model
    _fit_embeddings(lm, model.config.image_token_id + 1)
    n_tokens = model.image_token_count()
    config = LlavaConfig(
        vision_config=model.config.vision_config,
        text_config=lm.config,
        image_token_id=model.config.image_token_id,
        image_seq_length=n_tokens,
        projector_hidden_act=model.config.projector_hidden_act,
        vision_feature_layer=_negative_layers(model.config.vision_feature_layer,
                                              model.config.vision_config.num_hidden_layers),
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)),
    )
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    llava.model.vision_tower = model.vision_tower
    llava.model.language_model = lm.model
    llava.lm_head = lm.lm_head
    llava.model.multi_modal_projector.to_empty(device=model.projector.linear_1.weight.device)
    llava.model.multi_modal_projector.to(model.projector.linear_1.weight.dtype)
    llava.model.multi_modal_projector.load_state_dict(model.projector.state_dict(), strict=True)
    llava.generation_config = model.generation_config
    llava.config.use_cache = True
    return llava.eval()


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


def llava_image_processor(processor: PhiClipProcessor) -> LlavaImageProcessorPil:
    """transformers' Llava image processor preparing images as PhiClip's does: the tower's resize, crop and
    normalisation, and LLaVA's pad-to-square with the mean colour when the model pads (``image_aspect: pad``).

    It cannot apply PhiClip's EXIF orientation or its background under transparency: runtimes that load
    this processor (vLLM) convert images to RGB themselves.
    """
    settings = {k: v for k, v in processor.image_processor.to_dict().items()
                if k in ("size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale",
                         "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")}
    # Every setting the runtime reads is written: a tower processor without crop settings (SigLIP's resizes to
    # the exact size) must not inherit LlavaImageProcessor's default centre crop to 224.
    settings.setdefault("do_center_crop", False)
    return LlavaImageProcessorPil(**settings, do_pad=processor.image_aspect == "pad")


def make_processor(tokenizer, image_processor, vision_config, strategy: str, n_image_tokens: int) -> LlavaProcessor:
    """A ``LlavaProcessor`` whose ``<image>`` expansion gives exactly ``n_image_tokens`` tokens.

    Its chat template is PhiClip's (the LM's own, wrapped to accept content-part lists).
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


def check_out(source: str | Path, out: str | Path, overwrite: bool) -> Path:
    """``out`` as a path, once checked: outside ``source``, and empty unless ``overwrite``. Writes nothing.

    Raises :class:`ExportError` for a folder inside the source, ``FileExistsError`` for a
    non-empty one without ``overwrite``.
    """
    out = Path(out)
    src = Path(source).resolve()
    if Path(source).is_dir() and (out.resolve() == src or src in out.resolve().parents):
        raise ExportError(f"export folder {out} must lie outside {source}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace it)")
    return out


def partial_folder(out: Path) -> Path:
    """An empty ``OUT.partial`` folder: an export writes there, and :func:`finish_out` puts it in place of
    ``out`` once complete, so a failed export leaves an earlier one as it was."""
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def finish_out(partial: Path, out: Path) -> Path:
    """Replace ``out`` (if any) by the complete ``partial`` folder; returns ``out``."""
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


def write_llava(model: PhiClipForCausalLM, phiclip_processor: PhiClipProcessor, folder: Path, target: torch.dtype,
                shard_bytes: int = SHARD_BYTES) -> dict:
    """Write ``model`` (its LM without an adapter: merged, or the base) as a Llava folder into ``folder``.

    Config, safetensors, generation config, ``LlavaProcessor`` with PhiClip's chat template and
    ``preprocessor_config.json``. Returns the facts for ``phiclip_export.json``: ``dtype``,
    ``n_image_tokens``, ``tied_embeddings``, ``image_aspect`` and ``weights`` (file names).
    """
    n_image_tokens = model.image_token_count()
    llava = to_llava(model).to(target)
    processor = make_processor(phiclip_processor.tokenizer, llava_image_processor(phiclip_processor),
                               llava.config.vision_config, llava.config.vision_feature_select_strategy, n_image_tokens)
    tensors, tied = checkpoint_state(llava)
    files = write_safetensors(tensors, folder, shard_bytes)
    config = llava.config
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = target
    config.get_text_config().dtype = target
    if not tied:
        config.tie_word_embeddings = False
        config.get_text_config().tie_word_embeddings = False
    config.save_pretrained(folder)
    llava.generation_config.save_pretrained(folder)
    processor.save_pretrained(folder)
    # Also the classic preprocessor_config.json, for loaders that read the image processor alone.
    processor.image_processor.save_pretrained(folder)
    for file in files:
        os.chmod(folder / file, 0o644)
    return {"dtype": str(target).removeprefix("torch."), "n_image_tokens": n_image_tokens, "tied_embeddings": tied,
            "image_aspect": phiclip_processor.image_aspect, "weights": files}


def export_run(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    device: torch.device | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Merge the adapter and write a standard Llava checkpoint to ``out``; returns ``out``.

    ``source``: a training run directory, a PhiClip folder or a Hub repo id. ``dtype``:
    ``auto`` (the dtype of the LM's own checkpoint), ``float32``, ``bfloat16`` or ``float16``.
    The merge itself is done in float32 and the result cast afterwards.
    """
    where = locate(source)
    out = check_out(source, out, overwrite)
    device = device or torch.device("cpu")
    config = PhiClipConfig.from_pretrained(where)
    check_exportable(config)
    merged_adapter = config.adapter_subfolder is not None
    model, phiclip_processor = load_parts(source, dtype=torch.float32, device_map=str(device), merge_adapter=True)
    target = _target_dtype(dtype, model)
    tmp = partial_folder(out)
    written = write_llava(model, phiclip_processor, tmp, target, shard_bytes)
    info = {
        "source": str(source),
        "lm": model.config.text_model,
        "vision": model.config.vision_model,
        "dtype": written["dtype"],
        "n_image_tokens": written["n_image_tokens"],
        "lora_merged": merged_adapter,
        "vision_tower_trained": bool(model.config.vision_weights),
        "tied_embeddings": written["tied_embeddings"],
        "image_aspect": written["image_aspect"],
        "weights": written["weights"],
        "note": (
            "PhiClip answers text-only questions with the adapter disabled; this merged checkpoint "
            "always applies it."
        ),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    return finish_out(tmp, out)
