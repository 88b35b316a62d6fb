"""The language half of a GGUF export, through llama.cpp's own tools.

* :func:`write_lm_folder` saves an LM (the LoRA merged, or the base) as a plain Hugging Face
  causal-LM folder with the tokenizer and the GGUF chat template, the input ``convert_hf_to_gguf.py``
  reads; :func:`convert_lm` runs that converter, :func:`quantize` llama.cpp's quantizer and
  :func:`convert_lora` ``convert_lora_to_gguf.py`` (the adapter for the text-only route).
* :func:`gguf_chat_template`: PhiClip's template behind a short preamble for llama.cpp's message
  shapes, so that the media marker lands where PhiClip puts ``<image>``: first in the message,
  followed by a newline, then the text. ``llama-cpp-python``'s ``MTMDChatHandler`` hands image
  parts to the template as text parts holding the marker (``<__media__>``); ``llama-server``
  joins them into the content string with no newline after the marker (``<__media_XXXX__>text``).
  Both become ``<marker>\\n...text`` strings, which PhiClip's template passes through.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from export.llamacpp import LlamaCpp
from processing_phiclip import keep_sentencepiece_model

MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(); llama-server uses <__media_RANDOM__>
QUANT_TYPES = ("q8_0", "q4_k_m", "q4_0", "q5_k_m", "q6_k")  # through llama_model_quantize
ADAPTER_UNSUPPORTED = ("use_dora", "use_rslora")

# Jinja (Python's jinja2 and llama.cpp's own engine): turn llama.cpp's media parts / markers into
# "<marker>\n" at the start of a string content, then let PhiClip's template run on `messages`.
_MEDIA_PREAMBLE = """{%- set _mm = namespace(messages=[]) -%}
{%- for _msg in messages -%}
{%- set _m = namespace(media='', text='', rest='') -%}
{%- if _msg['content'] is string -%}
{%- set _m.rest = _msg['content'] -%}
{%- for _i in range(8) -%}
{%- if _m.rest.startswith('<__media') and '__>' in _m.rest -%}
{%- set _marker = _m.rest.split('__>')[0] + '__>' -%}
{%- set _cut = _marker | length -%}
{%- set _m.media = _m.media + _marker + '\\n' -%}
{%- set _m.rest = _m.rest[_cut:] -%}
{%- endif -%}
{%- endfor -%}
{%- set _mm.messages = _mm.messages + [dict(_msg, content=(_m.media + _m.rest) if _m.media else _msg['content'])] -%}
{%- elif _msg['content'] is none -%}
{%- set _mm.messages = _mm.messages + [_msg] -%}
{%- else -%}
{%- for _part in _msg['content'] -%}
{%- if _part['type'] == 'text' and _part['text'].startswith('<__media') and _part['text'].endswith('__>') -%}
{%- set _m.media = _m.media + _part['text'] + '\\n' -%}
{%- elif _part['type'] in ('image', 'image_url', 'media_marker') -%}
{%- set _m.media = _m.media + (_part['text'] if _part['text'] is defined else '__MARKER__') + '\\n' -%}
{%- elif _part['type'] == 'text' -%}
{%- set _m.text = _m.text + (' ' if _m.text else '') + _part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set _mm.messages = _mm.messages + [dict(_msg, content=_m.media + (_m.text | trim))] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = _mm.messages -%}
""".replace("__MARKER__", MEDIA_MARKER)


def gguf_chat_template(phiclip_template: str) -> str:
    """PhiClip's chat template with llama.cpp's media markers placed as PhiClip places ``<image>``."""
    if not isinstance(phiclip_template, str) or not phiclip_template.strip():
        raise ValueError("the PhiClip processor has no chat template")
    return _MEDIA_PREAMBLE + phiclip_template


def fit_vocabulary(lm: torch.nn.Module, n_tokens: int) -> None:
    """Give every tokenizer id an embedding row (``convert_hf_to_gguf.py`` requires it): new rows are the mean row.

    PhiClip's ``<image>`` id lies past the LM's vocabulary (the model splices features there);
    llama.cpp never looks that row up, since the media marker is replaced by the image chunk.
    """
    from export.checkpoint import _fit_embeddings

    _fit_embeddings(lm, n_tokens)


def write_lm_folder(lm: torch.nn.Module, tokenizer, chat_template: str, out: Path, dtype: torch.dtype) -> Path:
    """Save ``lm`` (a plain ``*ForCausalLM``) and ``tokenizer`` with ``chat_template`` as an HF folder in ``out``.

    ``add_bos_token`` / ``add_eos_token`` are written explicitly (false unless the tokenizer says
    otherwise, or the template writes ``bos_token``): PhiClip tokenizes prompts without them and llama.cpp adds
    what the GGUF says.
    """
    out.mkdir(parents=True, exist_ok=True)
    fit_vocabulary(lm, len(tokenizer))
    lm.to(dtype).save_pretrained(out)
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    keep_sentencepiece_model(tokenizer, out)  # the converters read a SentencePiece LM's vocabulary from it
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = chat_template
    # A template that writes bos_token (Llama-3's, Gemma's, Mistral's) gets it back as a token only where llama.cpp
    # adds BOS itself: llama-cpp-python renders bos_token as text without special pieces, and llama.cpp's own
    # template engine (common/chat.cpp) strips a rendered BOS when the GGUF adds one.
    writes_bos = tokenizer.bos_token is not None and "bos_token" in chat_template
    adds_bos = config.get("add_bos_token", getattr(tokenizer, "add_bos_token", False))
    config["add_bos_token"] = writes_bos or bool(adds_bos)
    config.setdefault("add_eos_token", bool(getattr(tokenizer, "add_eos_token", False)))
    for key in ("auto_map", "processor_class"):  # the folder is a plain LM now, not PhiClip
        config.pop(key, None)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if getattr(lm.config, "architectures", None) == ["Phi3ForCausalLM"] and not (out / "tokenizer.model").is_file():
        # llama.cpp's Phi-3 converter reads a byte-level BPE vocabulary (Phi-4-mini's) only under this class name
        config["tokenizer_class"] = "GPT2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def convert_lm(llama: LlamaCpp, folder: Path, out_file: Path, name: str) -> Path:
    """``convert_hf_to_gguf.py FOLDER --outtype f16`` in the side environment."""
    llama.run([llama.script("convert_hf_to_gguf.py"), str(folder), "--outfile", str(out_file), "--outtype", "f16",
               "--model-name", name], f"convert_hf_to_gguf.py {folder}")
    return out_file


def quantize(llama: LlamaCpp, src: Path, dst: Path, qtype: str, threads: int = 0) -> Path:
    """llama.cpp's quantizer (``llama_model_quantize``) from ``src`` (f16) to ``qtype``."""
    if qtype not in QUANT_TYPES:
        raise ValueError(f"quant type '{qtype}' is not one of f16, {', '.join(QUANT_TYPES)}")
    llama.runner("quantize", {"src": str(src), "dst": str(dst), "type": qtype, "threads": threads})
    return dst


def check_adapter(adapter_dir: Path) -> None:
    """Refuse adapters ``convert_lora_to_gguf.py`` would write with the wrong scale; raises ``ValueError``."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    for key in ADAPTER_UNSUPPORTED:
        if config.get(key):
            raise ValueError(f"{adapter_dir}/adapter_config.json: {key} is set; a llama.cpp LoRA adapter has plain "
                             "alpha/r scaling and no magnitude vector")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices"):
        if config.get(key):
            raise ValueError(f"{adapter_dir}/adapter_config.json: {key} is set; llama.cpp's LoRA format has one "
                             "rank and alpha for all layers and no fully trained modules")


def convert_lora(llama: LlamaCpp, adapter_dir: Path, base_folder: Path, out_file: Path) -> Path:
    """``convert_lora_to_gguf.py ADAPTER --base BASE --outtype f16``."""
    llama.run([llama.script("convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_folder),
               "--outfile", str(out_file), "--outtype", "f16"], f"convert_lora_to_gguf.py {adapter_dir}")
    return out_file
