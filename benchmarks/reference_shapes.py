"""The reference recipe's parts at their published shapes, as random-weight folders on disk.

Nothing is downloaded: the configs below are copies of the published ones, the weights are random
(seeded), and the tokenizer is a SentencePiece BPE model trained here on Python's own source, with
Phi-3.5-mini's vocabulary size, special tokens at their ids and chat template. The folders are what
``model.lm`` / ``model.vision`` name in a run config, so every caller goes through the project's own
loading code (``train.build.build_model``, the Hub files, the exports).

* :data:`PHI35_MINI` -- ``microsoft/Phi-3.5-mini-instruct``'s ``config.json`` (LongRoPE factors included);
* :data:`CLIP_L_336` -- ``openai/clip-vit-large-patch14-336``'s vision and text configs and its
  ``preprocessor_config.json``;
* :func:`parts` -- :class:`Parts` at the ``real`` shape or a ``small`` one (same structure, tiny sizes).
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# microsoft/Phi-3.5-mini-instruct config.json (3.8B parameters, 128K context through LongRoPE).
PHI35_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
PHI35_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
PHI35_MINI: dict[str, Any] = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 8192, "initializer_range": 0.02,
    "max_position_embeddings": 131072, "original_max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "rope_scaling": {"long_factor": PHI35_LONG_FACTOR, "short_factor": PHI35_SHORT_FACTOR, "type": "longrope"},
    "sliding_window": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32064,
}
PHI35_GENERATION = {"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000], "pad_token_id": 32000}
# Phi-3.5-mini's tokenizer: 32000 SentencePiece pieces (<unk> <s> </s> first), then these added tokens.
PHI35_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
               "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]
PHI35_RSTRIP = {"<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>", "<|placeholder4|>",
                "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"}
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# openai/clip-vit-large-patch14-336: ViT-L/14 at 336 px (577 positions: 576 patches + class token).
CLIP_L_336_VISION: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
    "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
}
CLIP_L_336_TEXT: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": 768, "hidden_act": "quick_gelu",
}
CLIP_PREPROCESSOR: dict[str, Any] = {
    "do_resize": True, "size": {"shortest_edge": 336}, "resample": 3, "do_center_crop": True,
    "crop_size": {"height": 336, "width": 336}, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}


@dataclass(frozen=True)
class Parts:
    """A shape of the recipe: the LM's config, the tower's configs and the tokenizer's size."""

    name: str
    lm: dict[str, Any]
    vision: dict[str, Any]
    text_tower: dict[str, Any]
    image_processor: dict[str, Any]
    pieces: int  # SentencePiece vocabulary; the added tokens follow at ids pieces, pieces + 1, ...
    corpus_chars: int  # characters of Python source the tokenizer is trained on


def parts(name: str) -> Parts:
    """``real``: Phi-3.5-mini + CLIP ViT-L/14-336 as published. ``small``: the same structure at toy sizes."""
    if name == "real":
        return Parts("real", PHI35_MINI, CLIP_L_336_VISION, CLIP_L_336_TEXT, CLIP_PREPROCESSOR, 32000, 12_000_000)
    if name != "small":
        raise ValueError(f"shape '{name}' is not one of real, small")
    head_dim = 16
    lm = dict(PHI35_MINI, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=1064, max_position_embeddings=4096,
              original_max_position_embeddings=1024,
              rope_scaling={"long_factor": PHI35_LONG_FACTOR[: head_dim // 2],
                            "short_factor": PHI35_SHORT_FACTOR[: head_dim // 2], "type": "longrope"},
              eos_token_id=1000, pad_token_id=1000)
    vision = dict(CLIP_L_336_VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  image_size=56, patch_size=14, projection_dim=16)
    text = dict(CLIP_L_336_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=1000, projection_dim=16)
    processor = dict(CLIP_PREPROCESSOR, size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return Parts("small", lm, vision, text, processor, 1000, 400_000)


def _corpus(path: Path, chars: int) -> Path:
    """Python's standard library source, ``chars`` characters of it: text the tokenizer can learn pieces from."""
    root = Path(sysconfig.get_paths()["stdlib"])
    taken, n = [], 0
    for file in sorted(root.rglob("*.py")):
        text = file.read_text(encoding="utf-8", errors="ignore")
        taken.append(text)
        n += len(text)
        if n >= chars:
            break
    path.write_text("\n".join(taken), encoding="utf-8")
    return path


def train_sentencepiece(out: Path, pieces: int, corpus_chars: int, **special: Any) -> Path:
    """``out/tokenizer.model``: a SentencePiece BPE model (byte fallback, digits split, as Llama's, Phi-3's and
    Gemma's are) of ``pieces`` pieces trained on ``corpus_chars`` characters of Python source. ``special``: the
    trainer's ids and symbols (default ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, no pad)."""
    import sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(out / "corpus.txt", corpus_chars)
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=pieces, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        **{"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1, **special},
        input_sentence_size=300_000, shuffle_input_sentence=True, num_threads=2, minloglevel=2,
        max_sentence_length=4096,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    return out / "tokenizer.model"


def write_tokenizer(shape: Parts, out: Path) -> Path:
    """A LlamaTokenizer like Phi-3.5-mini's: SentencePiece BPE (byte fallback, digits split) of ``shape.pieces``
    pieces, Phi-3's added tokens at ids ``pieces ...``, its chat template; ``tokenizer.model`` kept beside."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    train_sentencepiece(out, shape.pieces, shape.corpus_chars)
    settings = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False, "legacy": False,
                "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>",
                "model_max_length": shape.lm["max_position_embeddings"], "padding_side": "left",
                "clean_up_tokenization_spaces": False, "use_default_system_prompt": False}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False, rstrip=t in PHI35_RSTRIP)
                          for t in PHI35_ADDED])
    ids = tokenizer.convert_tokens_to_ids(PHI35_ADDED)
    if ids != list(range(shape.pieces, shape.pieces + len(PHI35_ADDED))):
        raise RuntimeError(f"added tokens landed at {ids}, not at {shape.pieces}...")
    tokenizer.chat_template = PHI35_TEMPLATE
    for key, value in settings.items():
        if key.endswith("_token"):
            setattr(tokenizer, key, value)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(settings)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def write_lm(shape: Parts, out: Path, seed: int = 0) -> Path:
    """A random-weight LM folder: the published config, bfloat16 weights (as published) in 5 GB shards,
    the generation config, and :func:`write_tokenizer`'s tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.for_model(**{k: v for k, v in shape.lm.items() if k not in ("architectures", "model_type")},
                                  model_type=shape.lm["model_type"])
    config.architectures = shape.lm["architectures"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    del model
    generation = dict(PHI35_GENERATION)
    if shape.name != "real":
        generation = {"bos_token_id": 1, "eos_token_id": [shape.pieces + 7, shape.pieces + 1, shape.pieces],
                      "pad_token_id": shape.pieces}
    GenerationConfig(**generation).save_pretrained(out)
    write_tokenizer(shape, out)
    return out


def write_tower(shape: Parts, out: Path, seed: int = 0) -> Path:
    """A random-weight CLIP folder like OpenAI's (text and vision towers, float32) with its image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(text_config=shape.text_tower, vision_config=shape.vision,
                        projection_dim=shape.vision["projection_dim"])
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(**shape.image_processor).save_pretrained(out)
    return out

