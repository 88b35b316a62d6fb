"""The family x road and tower x road matrix the tests run, and the README tables rendered from it.

``tests/test_family_roads.py`` runs every cell's roads in ``make test`` (the GGUF column in ``make test-gguf``,
``tests/test_gguf_llamacpp.py::test_each_family_converts_or_is_refused_by_name``); ``tests/test_family_roads.py::
test_readme_tables_are_the_matrix`` checks the README shows these tables. After changing the matrix, print them with
``python tests/family_matrix.py`` and paste them between the README's markers.
"""

from __future__ import annotations

from dataclasses import dataclass

ROADS = ("train", "hub", "chat", "api", "llava", "vllm-lora", "gguf")
ROAD_TITLES = {
    "train": "`phiclip train`",
    "hub": "Hub files (auto classes, pipeline)",
    "chat": "`phiclip chat`",
    "api": "API",
    "llava": "Llava export",
    "vllm-lora": "vllm-lora export",
    "gguf": "GGUF (llama.cpp)",
}


@dataclass(frozen=True)
class LM:
    """A family's tiny LM: its template fixture (tests/templates/NAME.json), the transformers class it is built as
    (tests/tiny_models.py), the attention PhiClip picks for it, the family as the README names it, and the
    tokenizer it wears (``smollm2``: SmolLM2's byte-level BPE; ``gemma-sentencepiece``: a SentencePiece model with
    Gemma's special tokens and ids)."""

    kind: str
    attention: str
    family: str
    tokenizer: str = "smollm2"


@dataclass(frozen=True)
class Tower:
    """A tower as it ships (tests/tiny_models.py ``save_tiny_tower``) and the feature strategy it is trained with."""

    kind: str
    strategy: str
    family: str


LMS = {
    "llama3": LM("llama", "sdpa", "Llama-3 (`LlamaForCausalLM`)"),
    "llama3.1": LM("llama", "sdpa", "Llama-3.1, dated system header (`LlamaForCausalLM`)"),
    "phi3.5": LM("phi3", "sdpa", "Phi-3.5 template, BPE vocabulary as Phi-4-mini's (`Phi3ForCausalLM`)"),
    "qwen2.5": LM("qwen2", "sdpa", "Qwen2.5 (`Qwen2ForCausalLM`)"),
    "qwen3": LM("qwen3", "sdpa", "Qwen3, thinking template (`Qwen3ForCausalLM`)"),
    "gemma2": LM("gemma2", "eager", "Gemma-2 (`Gemma2ForCausalLM`), SentencePiece", "gemma-sentencepiece"),
    "gemma3": LM("gemma3", "sdpa", "Gemma-3 text (`Gemma3ForCausalLM`), SentencePiece", "gemma-sentencepiece"),
    "mistral-nemo": LM("mistral", "sdpa", "Mistral NeMo (`MistralForCausalLM`)"),
    "smollm3": LM("smollm3", "sdpa", "SmolLM3, thinking template (`SmolLM3ForCausalLM`)"),
}
TOWERS = {
    "siglip": Tower("siglip", "full", "SigLIP (`SiglipImageProcessor`)"),
    "siglip2": Tower("siglip2", "full", "SigLIP2 fixed resolution (model type `siglip`)"),
    "clip-default": Tower("clip", "default", "CLIP, `default` (class token dropped)"),
    "clip-full": Tower("clip", "full", "CLIP, `full`"),
}
TOWER_LMS = ("llama3", "qwen3")
# Each LM family with a SigLIP tower; each other tower with two LMs.
CELLS = [(lm, "siglip") for lm in LMS] + [(lm, tower) for tower in TOWERS if tower != "siglip" for lm in TOWER_LMS]

# What a road refuses, by name, before writing anything: (LM or tower, road) -> words the refusal contains.
# Under transformers 5 a Qwen2 LM's tokenizer loads as Qwen2Tokenizer, whose pre-tokenizer llama.cpp does not know
# for SmolLM2's vocabulary (the tiny Qwen2.5 wears it). (The tiny Phi-3.5 is shaped like Phi-4-mini: Phi-3 layers, a
# BPE vocabulary; a Phi-3.5 with its SentencePiece tokenizer converts in make test-gguf's real-shape test.)
REFUSED = {
    ("gemma2", "llava"): "final_logit_softcapping",
    ("gemma2", "vllm-lora"): "final_logit_softcapping",
    ("qwen2.5", "gguf"): "BPE pre-tokenizer was not recognized",
    ("clip-default", "gguf"): "vision_feature_select_strategy 'default'",
    ("clip-full", "gguf"): "vision_feature_select_strategy 'full'",
    ("siglip2", "gguf"): "image_processor.resample is bilinear",
}
# Towers refused up front by every road (phiclip train names them).
REFUSED_TOWERS = {"siglip2-naflex": "SigLIP2 NaFlex (model type `siglip2`): variable patch counts per image"}


def refusal(cell: tuple[str, str], road: str) -> str | None:
    """The words a road's refusal of ``cell`` contains, or None where the road runs."""
    lm, tower = cell
    return REFUSED.get((lm, road)) or REFUSED.get((tower, road))


def _mark(cell: tuple[str, str], road: str) -> str:
    reason = refusal(cell, road)
    return "yes" if reason is None else f"refused: `{reason}`"


def render_tables() -> str:
    """The README's two tables, in Markdown."""
    header = "| {} | " + " | ".join(ROAD_TITLES[r] for r in ROADS) + " |"
    rule = "|---" * (len(ROADS) + 1) + "|"
    lines = [header.format("LM family (with a SigLIP tower)"), rule]
    for lm, spec in LMS.items():
        cell = (lm, "siglip")
        lines.append(f"| {spec.family}, attention `{spec.attention}` | " + " | ".join(_mark(cell, r) for r in ROADS)
                     + " |")
    lines += ["", header.format("Tower (each with Llama-3 and Qwen3)"), rule]
    for tower, spec in TOWERS.items():
        marks = [" / ".join(sorted({_mark((lm, tower), road) for lm in TOWER_LMS})) for road in ROADS]
        lines.append(f"| {spec.family} | " + " | ".join(marks) + " |")
    for tower, reason in REFUSED_TOWERS.items():
        lines.append(f"| {reason} | " + " | ".join("refused" for _ in ROADS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_tables())
