"""Export a PhiClip model for vLLM with PhiClip's routing: the base LM unmerged, the LoRA adapter beside it.

PhiClip answers image questions with its LoRA adapter on and text-only questions with the base LM
(``text_only_base_lm``). vLLM does the same per request when it serves the base model with LoRA
enabled: a request naming the adapter runs with it, a request naming the base model without it,
and both kinds share its continuous batches. ``OUT`` holds:

* the Llava checkpoint of :mod:`export.checkpoint` with the **base** LM (tower + projector + LM,
  nothing merged): config, safetensors, ``LlavaProcessor`` with PhiClip's chat template;
* ``lora/``: the adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``);
* ``README.md``: which served model name answers which route, and the ``vllm serve`` command;
* ``phiclip_export.json``: what was written.

Adapter names. vLLM applies an adapter by module name: it strips ``base_model.model.`` from each
tensor name, maps the rest with the model's ``hf_to_vllm_mapper`` (Llava, vLLM 0.32:
``model.language_model.`` -> ``language_model.model.``) and looks the result up among the modules
it wrapped with LoRA (``vllm/lora/model_manager.py``; by default only under the language model,
``get_mm_mapping().language_model``). PhiClip's adapter names are relative to the LM
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``); served as they are, they
match no module, and vLLM answers under the adapter's name with the base model, logging that only
at debug level. They are written here as PEFT names them on a transformers
``LlavaForConditionalGeneration`` (``base_model.model.model.language_model.layers.0...``), and
``target_modules`` becomes a pattern restricted to the language model, so that PEFT on transformers
puts no LoRA layers on the tower's own ``q_proj``/``k_proj``/``v_proj`` either. vLLM packs
``q/k/v_proj`` into ``qkv_proj`` and ``gate/up_proj`` into ``gate_up_proj`` itself
(``packed_modules_mapping``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chat.assistant import load_parts, locate
from configuration_phiclip import PhiClipConfig
from export.checkpoint import (
    INFO_FILE,
    SHARD_BYTES,
    ExportError,
    _target_dtype,
    check_exportable,
    check_out,
    finish_out,
    partial_folder,
    write_llava,
)

LORA_DIR = "lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# vLLM 0.32's accepted --max-lora-rank values (vllm/config/lora.py, MaxLoRARanks).
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# One adapter, two slots: vLLM's CPU LoRA ops (vllm/lora/ops/torch_ops, 0.32) look up a base-model
# row's slot index -1 as the *last* slot instead of skipping it, so with the default single slot a
# text-only request batched beside an image request gets the adapter too (vllm-project/vllm PR
# #48421, open). An empty last slot makes that lookup add zeros; on GPUs it only costs one slot.
VLLM_MAX_LORAS = 2

_LM_PREFIX = "base_model.model.model."  # PEFT's prefix + the causal LM's decoder (``lm.model``)
_LLAVA_LM_PREFIX = "base_model.model.model.language_model."  # the same decoder inside LlavaForConditionalGeneration
_LORA_SUFFIX = re.compile(r"\.lora_[AB]\.weight$")
# adapter_config.json settings vLLM refuses or that change what the adapter computes beyond A/B matrices:
# field -> what it is. Each one set is refused by name.
_UNSUPPORTED = {
    "use_dora": "DoRA (a magnitude vector per module)",
    "lora_bias": "LoRA bias",
    "modules_to_save": "fully trained modules",
    "trainable_token_indices": "trained embedding rows",
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "activated LoRA",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "target_parameters": "LoRA on parameters rather than modules",
}


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds an adapter of ``rank``; raises ``ExportError``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ExportError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")


def llava_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """PhiClip's adapter (``adapter_dir``) renamed for the Llava checkpoint: ``(adapter_config, tensors)``.

    Raises :class:`ExportError` naming the file and the field or tensor vLLM could not serve.
    """
    config_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ExportError(f"LoRA adapter file missing: {path}")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ExportError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LORA adapters can be served")
    for field, what in _UNSUPPORTED.items():
        if config.get(field):
            raise ExportError(f"{config_path}: {field} is set ({what}); vLLM serves plain LoRA adapters only")
    if config.get("bias", "none") != "none":
        raise ExportError(f"{config_path}: bias is {config['bias']!r}; vLLM serves adapters without bias only")
    if not isinstance(config.get("init_lora_weights", True), bool):
        raise ExportError(f"{config_path}: init_lora_weights is {config['init_lora_weights']!r}, an init that "
                          "changes the base weights; vLLM serves the base model as it is")
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_path), "pt") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
            if not name.startswith(_LM_PREFIX) or not _LORA_SUFFIX.search(name):
                raise ExportError(f"{weights_path}: tensor {name} is not a LoRA A/B matrix inside the LM's decoder "
                                  f"({_LM_PREFIX}...lora_A/lora_B.weight); vLLM's Llava applies LoRA there only")
            tensors[_LLAVA_LM_PREFIX + name[len(_LM_PREFIX):]] = f.get_tensor(name)
    if not tensors:
        raise ExportError(f"{weights_path}: no LoRA tensors")
    leaves = sorted({_LORA_SUFFIX.sub("", name).rsplit(".", 1)[-1] for name in tensors})
    out = dict(config)
    # PEFT matches a string in full against module names: LoRA on the language model's modules only.
    out["target_modules"] = r"model\.language_model\..*\.(" + "|".join(map(re.escape, leaves)) + ")"
    out["base_model_name_or_path"] = None  # the base is the folder above, not the LM's own repository
    out["inference_mode"] = True
    return out, tensors


def serve_command(out: Path, name: str, max_rank: int) -> str:
    """The ``vllm serve`` line for ``out``: the base model as ``NAME-text``, the adapter as ``NAME-image``."""
    return (f"vllm serve {out} --served-model-name {name}-text --enable-lora "
            f"--lora-modules {name}-image={out / LORA_DIR} --max-lora-rank {max_rank} --max-loras {VLLM_MAX_LORAS}")


def card(name: str, folder: str, rank: int, max_rank: int, text_only_base_lm: bool) -> str:
    """README.md of the export folder (named ``folder``): which served name answers which route, and the command."""
    if text_only_base_lm:
        text_row = f"| text only | `{name}-text` | the base LM, adapter off (PhiClip's `text_only_base_lm`) |"
    else:
        text_row = (f"| text only | `{name}-image` | the LM with the adapter: this model was trained with "
                    "`text_only_base_lm: false` |")
    ranks = ", ".join(map(str, VLLM_MAX_LORA_RANKS))
    return f"""# {name}: PhiClip for vLLM, base model + LoRA adapter

This folder is a Llava checkpoint whose language model is PhiClip's **base LM** (nothing merged),
with PhiClip's LoRA adapter (rank {rank}) in `{LORA_DIR}/`. Served by vLLM with LoRA enabled, it
answers as PhiClip does: image questions with the adapter, text-only questions with the base LM,
both in the same continuous batches.

| question | model name to send | what runs |
|---|---|---|
| with an image | `{name}-image` | tower + projector + LM with the LoRA adapter |
{text_row}

vLLM does not choose the route: the client does, with the request's `model` field. An image sent
to `{name}-text` is answered without the adapter, a text question sent to `{name}-image` with it
(as the merged Llava export answers every question).

Serve it from the folder that holds this one:

```bash
vllm serve {folder} --served-model-name {name}-text --enable-lora \\
  --lora-modules {name}-image={folder}/{LORA_DIR} --max-lora-rank {max_rank} --max-loras {VLLM_MAX_LORAS}
```

`--max-lora-rank` must be at least the adapter's rank ({rank}) and one of vLLM's values
({ranks}). `--max-loras {VLLM_MAX_LORAS}` keeps a LoRA slot empty: vLLM's CPU build (seen in
0.32) applies the adapter in its last slot to base-model requests batched beside adapter requests
(vllm-project/vllm PR #48421), so with one slot a request to `{name}-text` answered together with
one to `{name}-image` gets the adapter too; on GPUs the empty slot costs only memory.

The adapter's tensor names follow `LlavaForConditionalGeneration`'s layout
(`base_model.model.model.language_model.layers.N...`), which vLLM maps onto its language model;
PEFT loads the same folder on transformers:
`PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(FOLDER), FOLDER + "/{LORA_DIR}")`.

A model trained with QLoRA is written with its unquantised base LM, while the adapter was trained
against the base's 4-bit rounding: answers may differ slightly from PhiClip's 4-bit ones.
"""


def export_vllm_lora(
    source: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    name: str | None = None,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Path:
    """Write the base-LM Llava checkpoint and the renamed LoRA adapter of ``source`` to ``out``; returns ``out``.

    ``source``: a training run directory, a PhiClip folder or a Hub repo id. ``dtype``: the
    checkpoint's (``auto``: the LM's own); the adapter keeps its stored dtype (vLLM casts it).
    ``name``: the stem of the served names (default: the run's folder name). Raises
    :class:`ExportError` for a model without an adapter or with one vLLM cannot serve.
    """
    where = locate(source)
    if not Path(where).is_dir():
        from huggingface_hub import snapshot_download

        where = snapshot_download(where)
    folder = Path(where)
    config = PhiClipConfig.from_pretrained(folder)
    check_exportable(config)
    if config.adapter_subfolder is None:
        raise ExportError(f"{source} has no LoRA adapter: there is no route to separate; export it with "
                          "--format llava")
    adapter_config, tensors = llava_adapter(folder / config.adapter_subfolder)
    rank = max([int(adapter_config["r"]), *map(int, (adapter_config.get("rank_pattern") or {}).values())])
    max_rank = vllm_max_lora_rank(rank)
    if name is None:
        name = folder.parent.name if folder.name == "model" else folder.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ExportError(f"name {name!r}: use letters, digits, '.', '_' and '-' (it becomes vLLM's model names)")
    out = check_out(source, out, overwrite)

    model, phiclip_processor = load_parts(folder, dtype=torch.float32, device_map="cpu", load_adapter=False)
    target = _target_dtype(dtype, model)
    tmp = partial_folder(out)
    written = write_llava(model, phiclip_processor, tmp, target, shard_bytes)
    (tmp / LORA_DIR).mkdir()
    (tmp / LORA_DIR / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / LORA_DIR / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    text_only_base_lm = bool(getattr(config, "text_only_base_lm", True))
    (tmp / "README.md").write_text(card(name, out.name, rank, max_rank, text_only_base_lm), encoding="utf-8")
    info = {
        "source": str(source),
        "format": "vllm-lora",
        "name": name,
        "lm": config.text_model,
        "vision": config.vision_model,
        **written,
        "lora_merged": False,
        "lora_dir": LORA_DIR,
        "lora_rank": rank,
        "lora_alpha": adapter_config["lora_alpha"],
        "lora_modules": sorted({_LORA_SUFFIX.sub("", k).rsplit(".", 1)[-1] for k in tensors}),
        "max_lora_rank": max_rank,
        "max_loras": VLLM_MAX_LORAS,
        "served_names": {"image": f"{name}-image", "text": f"{name}-text" if text_only_base_lm else f"{name}-image"},
        "text_only_base_lm": text_only_base_lm,
        "vision_tower_trained": bool(config.vision_weights),
        "serve": serve_command(Path(out.name), name, max_rank),
    }
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    return finish_out(tmp, out)
