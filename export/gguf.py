"""``phiclip export ... --format gguf``: a PhiClip model as GGUF files for llama.cpp, Ollama and LM Studio.

Written to ``OUT`` (names chosen so that ``llama-server -hf OWNER/REPO`` pairs model and mmproj):

* ``<name>-f16.gguf`` and one ``<name>-<QUANT>.gguf`` per requested type: the LM with the LoRA
  merged, converted by llama.cpp's ``convert_hf_to_gguf.py`` and quantized by llama.cpp's quantizer;
* ``mmproj-<name>-f16.gguf``: tower + projector (:mod:`export.mmproj`);
* ``text-only/<name>-base-f16.gguf`` + ``text-only/<name>-lora-f16.gguf``: the base LM and the
  adapter, for PhiClip's text-only route (adapter off for questions without an image);
* ``Modelfile`` (+ ``Modelfile.text-only``), ``README.md`` (the card), ``phiclip_gguf.json``.

Every refusal happens before anything is written: a model llama.cpp cannot compute exactly is
refused, naming the setting and why; a CLIP tower with strategy ``default`` is exported without
its class token only when the caller accepts that (``allow_approximate_vision``,
``--allow-approximate-vision``). After writing, the export runs llama.cpp on two probe pictures
(square and 3:2) and records the per-token cosine between llama.cpp's image embeddings and
PhiClip's ``get_image_features`` in the card and in ``phiclip_gguf.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from chat.assistant import load_parts, locate
from configuration_phiclip import PhiClipConfig
from export import gguf_card, gguf_lm, mmproj
from export.checkpoint import _target_dtype, check_out, finish_out, partial_folder
from export.llamacpp import LlamaCpp, LlamaCppError, find_llamacpp
from modeling_phiclip import ADAPTER_DIR, PhiClipForCausalLM
from processing_phiclip import TemplateError

INFO_FILE = "phiclip_gguf.json"
TEXT_DIR = "text-only"


def file_names(name: str, quants: list[str]) -> dict[str, str]:
    """``{"f16" | quant: LM file, "mmproj": ..., "base": ..., "lora": ...}`` for export ``name``."""
    names = {q: f"{name}-{'f16' if q == 'f16' else q.upper()}.gguf" for q in ["f16", *quants] if q}
    names["mmproj"] = f"mmproj-{name}-f16.gguf"
    names["base"] = f"{TEXT_DIR}/{name}-base-f16.gguf"
    names["lora"] = f"{TEXT_DIR}/{name}-lora-f16.gguf"
    return names


def _hub_name(name: str) -> str:
    """The Hub repository behind an ``offline:`` model name (the demo's LM), else the name as given."""
    from runtime.models import HUB_NAMES, PREFIX

    return HUB_NAMES.get(name[len(PREFIX):], name) if str(name).startswith(PREFIX) else str(name)


def _quants(quants: list[str] | tuple[str, ...]) -> list[str]:
    out = []
    for q in quants:
        q = q.lower()
        if q != "f16" and q not in gguf_lm.QUANT_TYPES:
            raise mmproj.GGUFExportError(f"--quant {q}: not one of f16, {', '.join(gguf_lm.QUANT_TYPES)}")
        if q != "f16" and q not in out:
            out.append(q)
    return out


def probe_picture(width: int, height: int) -> Image.Image:
    """A fixed synthetic picture (gradient, shapes) for the export's own llama.cpp check."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                             np.broadcast_to((x + y) / 2, (height, width, 1))], axis=2).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.1, height * 0.2, width * 0.45, height * 0.7], fill=(220, 40, 40))
    draw.rectangle([width * 0.55, height * 0.3, width * 0.9, height * 0.85], fill=(30, 60, 200))
    return image


def vision_cosine(llama: LlamaCpp, model: PhiClipForCausalLM, processor, lm_file: Path, mmproj_file: Path,
                  picture: Image.Image, work: Path) -> float:
    """Minimum over image tokens of the cosine between llama.cpp's and PhiClip's image embeddings."""
    path = work / f"probe-{picture.width}x{picture.height}.png"
    picture.save(path)
    out = work / "probe.npy"
    llama.runner("embed", {"model": str(lm_file), "mmproj": str(mmproj_file), "image": str(path), "out": str(out),
                           "width": int(model.config.text_config.hidden_size)})
    theirs = np.load(out)
    with torch.no_grad():
        ours = model.get_image_features(processor.image_pixels([picture]))[0].float().cpu().numpy()
    if theirs.shape != ours.shape:
        raise mmproj.GGUFExportError(f"llama.cpp emits {theirs.shape[0]} image tokens, PhiClip {ours.shape[0]}")
    cos = (theirs * ours).sum(-1) / (np.linalg.norm(theirs, axis=-1) * np.linalg.norm(ours, axis=-1))
    return float(cos.min())


# llama.cpp sets Phi-3's special-token attributes on any model whose general.name contains "phi3" or "phi-3",
# looking these tokens up by text: a vocabulary without them (Phi-4-mini's) fails to load.
_PHI3_NAME_TOKENS = ("<s>", "</s>", "<unk>", "<|endoftext|>")


def _check_name(name: str, vocab: dict[str, int]) -> None:
    """Refuse a name llama.cpp would load this vocabulary wrongly under; raises ``GGUFExportError``."""
    lowered = name.lower()
    missing = [t for t in _PHI3_NAME_TOKENS if t not in vocab]
    if ("phi3" in lowered or "phi-3" in lowered) and missing:
        raise mmproj.GGUFExportError(
            f"name '{name}': llama.cpp treats a model whose name contains 'phi3' or 'phi-3' as Phi-3 and fails to load "
            f"it when the vocabulary lacks {', '.join(missing)} (as this one does); pick a name without it")


def export_gguf(
    source: str | Path,
    out: str | Path,
    *,
    quants: list[str] | tuple[str, ...] = (),
    name: str | None = None,
    repo_id: str | None = None,
    text_route: bool = True,
    overwrite: bool = False,
    allow_approximate_vision: bool = False,
    llama: LlamaCpp | None = None,
) -> Path:
    """Write the GGUF export of ``source`` (run directory, PhiClip folder or Hub repo id) to ``out``; returns ``out``.

    ``quants``: llama.cpp types besides f16 (``q8_0``, ``q4_k_m``, ...). ``text_route``: also write
    the base LM and the LoRA adapter (models with an adapter only). ``repo_id``: named in the card's
    commands (default ``OWNER/<name>-GGUF``). ``allow_approximate_vision``: export a CLIP tower with
    strategy ``default`` without its class token (refused otherwise; see :func:`export.mmproj.plan_vision`).
    Raises :class:`export.mmproj.GGUFExportError` for models llama.cpp cannot run,
    :class:`export.llamacpp.LlamaCppError` when its environment is missing.
    """
    where = locate(source)
    config = PhiClipConfig.from_pretrained(where)
    plan = mmproj.plan_vision(config, allow_approximate=allow_approximate_vision)
    extra = _quants(quants)
    has_adapter = config.adapter_subfolder is not None
    text_route = bool(text_route and has_adapter and getattr(config, "text_only_base_lm", True))
    folder = Path(where)
    if text_route and folder.is_dir():
        gguf_lm.check_adapter(folder / (config.adapter_subfolder or ADAPTER_DIR))
    if name is None:
        name = Path(where).parent.name if Path(where).name == "model" else Path(where).name.split("/")[-1]
    repo_id = repo_id or f"OWNER/{name}-GGUF"
    names = file_names(name, extra)
    out = check_out(source, out, overwrite)

    model, processor = load_parts(source, dtype=torch.float32, merge_adapter=True)  # PhiClip's own code only
    _check_name(name, processor.tokenizer.get_vocab())
    resample = getattr(processor.image_processor, "resample", Image.Resampling.BICUBIC)
    if resample is not None and int(resample) != Image.Resampling.BICUBIC:
        raise mmproj.GGUFExportError(
            f"image_processor.resample is {Image.Resampling(int(resample)).name.lower()} (the tower's own setting, "
            "as SigLIP2 releases ship it): llama.cpp's mtmd resizes every image bicubically, so its image features "
            "would not be the ones the model was trained on (measured: greedy answers differ from PhiClip's on 3-4 "
            "of 4 questions). Train with a bicubic image processor to export to GGUF.")
    model.eval()
    llama = llama or find_llamacpp()
    dtype = _target_dtype("auto", model)
    template = gguf_lm.gguf_chat_template(processor.chat_template)
    try:  # the Ollama Modelfile copies the template's role markers; llama.cpp renders the embedded Jinja itself
        turns = gguf_card.chat_turns(lambda messages, gen: processor.render(messages, add_generation_prompt=gen))
        no_modelfile = None
    except (gguf_card.TemplateShapeError, TemplateError) as err:
        turns, no_modelfile = None, str(err)
    stops = [processor.tokenizer.eos_token] if processor.tokenizer.eos_token else []
    if turns is not None and turns.assistant[1].strip() and turns.assistant[1].strip() not in stops:
        stops.append(turns.assistant[1].strip())

    tmp = partial_folder(out)
    with tempfile.TemporaryDirectory(prefix="phiclip-gguf-") as scratch:
        work = Path(scratch)
        tokenizer = processor.tokenizer
        gguf_lm.write_lm_folder(model.language_model, tokenizer, template, work / "lm", dtype)
        try:
            gguf_lm.convert_lm(llama, work / "lm", tmp / names["f16"], name)
        except LlamaCppError as err:
            shutil.rmtree(tmp)
            reason = str(err).strip().splitlines()[-1]
            raise mmproj.GGUFExportError(f"llama.cpp's converter cannot convert this LM "
                                         f"({model.language_model.config.architectures[0]}): {reason}") from err
        shutil.rmtree(work / "lm")
        for q in extra:
            gguf_lm.quantize(llama, tmp / names["f16"], tmp / names[q], q)
        mmproj.write_mmproj(model, processor.image_processor, tmp / names["mmproj"], name=name, plan=plan,
                            llama_cpp_version=llama.version)
        side = int(config.vision_config.image_size)
        cos_square = vision_cosine(llama, model, processor, tmp / names["f16"], tmp / names["mmproj"],
                                   probe_picture(side * 2, side * 2), work)
        cos_wide = vision_cosine(llama, model, processor, tmp / names["f16"], tmp / names["mmproj"],
                                 probe_picture(side * 3, side * 2), work)
        text_files: dict[str, int] = {}
        if text_route:
            (tmp / TEXT_DIR).mkdir()
            del model
            base = PhiClipForCausalLM.from_pretrained(where, dtype=torch.float32, load_adapter=False)
            gguf_lm.write_lm_folder(base.language_model, tokenizer, template, work / "base", dtype)
            del base
            gguf_lm.convert_lm(llama, work / "base", tmp / names["base"], f"{name}-base")
            adapter = folder / (config.adapter_subfolder or ADAPTER_DIR) if folder.is_dir() else None
            if adapter is None:
                from huggingface_hub import snapshot_download

                adapter = Path(snapshot_download(where, allow_patterns=[f"{config.adapter_subfolder}/*"])) / (
                    config.adapter_subfolder)
            gguf_lm.convert_lora(llama, adapter, work / "base", tmp / names["lora"])
            text_files = {names["base"]: (tmp / names["base"]).stat().st_size,
                          names["lora"]: (tmp / names["lora"]).stat().st_size}

    lm_files = {names[q]: (tmp / names[q]).stat().st_size for q in ["f16", *extra]}
    default_quant = "q8_0" if "q8_0" in extra else (extra[0] if extra else "f16")
    if turns is not None:
        (tmp / "Modelfile").write_text(gguf_card.modelfile(names[default_quant], names["mmproj"], turns, stops))
        if text_route:
            (tmp / "Modelfile.text-only").write_text(gguf_card.modelfile(names["base"], None, turns, stops))
    pad = tuple(getattr(processor, "pad_colour", mmproj.LLAMACPP_PAD_COLOUR))
    facts = gguf_card.CardFacts(
        repo_id=repo_id, name=name, lm_files=lm_files, mmproj_file=names["mmproj"],
        mmproj_size=(tmp / names["mmproj"]).stat().st_size, text_files=text_files,
        base_models=[_hub_name(config.text_model), _hub_name(config.vision_model)], vision=plan.note,
        vision_exact=plan.exact,
        cosine_square=cos_square, cosine_wide=cos_wide, image_aspect=getattr(processor, "image_aspect", "crop"),
        pad_colour=pad, llama_pad_colour=mmproj.LLAMACPP_PAD_COLOUR, image_size=int(config.vision_config.image_size),
        n_image_tokens=(int(config.vision_config.image_size) // int(config.vision_config.patch_size)) ** 2,
        llama_cpp_python=llama.version, default_quant=default_quant, no_modelfile=no_modelfile,
    )
    (tmp / "README.md").write_text(gguf_card.card(facts))
    info = {"source": str(source), "name": name, "files": {**lm_files, names["mmproj"]: facts.mmproj_size,
                                                           **text_files},
            "llama_cpp_python": llama.version, "vision": plan.note, "vision_exact": plan.exact,
            "approximate_vision_allowed": allow_approximate_vision,
            "vision_cosine_min": {"square": cos_square, "wide_3x2": cos_wide},
            "image_aspect": facts.image_aspect, "pad_colour": list(pad),
            "llama_cpp_pad_colour": list(mmproj.LLAMACPP_PAD_COLOUR), "media_marker": gguf_lm.MEDIA_MARKER,
            "default_quant": default_quant, "text_route": text_route, "repo_id": repo_id,
            "no_modelfile": no_modelfile}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
    return finish_out(tmp, out)
