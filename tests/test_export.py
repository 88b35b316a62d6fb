"""Export: merged Llava checkpoint, weight names, processor + chat template parity, fresh-process logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_toy_data, tiny_config, tokenizer_with_template, write_image
from PIL import Image

ATOL = 1e-4


# --- chat template / processor, no model needed ----------------------------------------


def _processor(tokenizer, clip_dir: Path, strategy: str, system_prompt: str | None = None):
    from transformers import AutoConfig, AutoImageProcessor

    from export.checkpoint import make_processor
    from processing_phiclip import PhiClipProcessor

    phiclip = PhiClipProcessor.from_parts(AutoImageProcessor.from_pretrained(clip_dir), tokenizer, system_prompt)
    n = 16 + (strategy == "full")  # 32x32 pixels, 8x8 patches, CLS kept with "full"
    vision_config = AutoConfig.from_pretrained(clip_dir)
    return make_processor(phiclip.tokenizer, phiclip.image_processor, vision_config, strategy, n), n


def _phiclip_ids(tokenizer, messages, n_image_tokens):
    """What PhiClip feeds its model (one <image>), with <image> expanded as the Llava checkpoint needs it."""
    from transformers import CLIPImageProcessorPil

    from processing_phiclip import PhiClipProcessor

    phiclip = PhiClipProcessor(CLIPImageProcessorPil(), tokenizer, chat_template=tokenizer.chat_template)
    ids = []
    for token in phiclip.encode_chat(messages, add_generation_prompt=True, image_markers=True)[0]:
        ids.extend([token] * (n_image_tokens if token == phiclip.image_token_id else 1))
    return ids


@pytest.mark.parametrize("family", ["chatml", "phi3"])
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_processor_matches_phiclip_prompt(smol_tokenizer_dir, tiny_clip_dir, family, strategy):
    tok = tokenizer_with_template(smol_tokenizer_dir, family)
    processor, n = _processor(tok, tiny_clip_dir, strategy)
    image = Image.new("RGB", (40, 40), (200, 30, 30))
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it? "}]}]
    text = processor.apply_chat_template(parts, add_generation_prompt=True)
    ids = processor(images=[image], text=text, return_tensors="pt")["input_ids"][0].tolist()
    expected = _phiclip_ids(processor.tokenizer, [{"role": "user", "content": "<image>\nWhat colour is it?"}], n)
    assert ids == expected
    assert ids.count(processor.image_token_id) == n
    # Text-only: content parts and a plain string render alike, as the LM's own template does.
    plain = [{"role": "user", "content": "Hello there"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    rendered = processor.apply_chat_template(plain, add_generation_prompt=True)
    assert rendered == processor.apply_chat_template(as_parts, add_generation_prompt=True)
    assert processor.tokenizer(rendered, add_special_tokens=False)["input_ids"] == _phiclip_ids(processor.tokenizer, plain, 0)


def test_processor_system_prompt_and_image_last(smol_tokenizer_dir, tiny_clip_dir):
    tok = tokenizer_with_template(smol_tokenizer_dir, "phi3")
    processor, n = _processor(tok, tiny_clip_dir, "default", system_prompt="Answer briefly.")
    # Image after the text in the request still lands first, where training put it.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Which shape?"}, {"type": "image"}]}]
    text = processor.apply_chat_template(parts, add_generation_prompt=True)
    assert text.startswith("<|system|>\nAnswer briefly.<|end|>\n<|user|>\n<image>\nWhich shape?")
    ids = processor(images=[Image.new("RGB", (32, 32))], text=text)["input_ids"][0]
    expected = _phiclip_ids(processor.tokenizer, [{"role": "user", "content": "<image>\nWhich shape?"}], n)
    assert list(ids) == expected
    # A conversation that brings its own system turn keeps it.
    own = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert "Answer briefly." not in processor.apply_chat_template(own, add_generation_prompt=True)


def test_wrap_rejects_missing_template():
    from processing_phiclip import wrap_chat_template

    with pytest.raises(ValueError, match="no chat template"):
        wrap_chat_template(None)


# --- refusing what a Llava checkpoint cannot hold ----------------------------------------


def _fake_model(tmp_path: Path, **settings) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig

    from configuration_phiclip import PhiClipConfig

    folder = tmp_path / "model"
    PhiClipConfig(text_config=LlamaConfig().to_dict(), vision_config=CLIPVisionConfig().to_dict(),
                  **settings).save_pretrained(folder)
    return folder


def test_export_refuses_pooled_features(tmp_path, capsys):
    from phiclip_cli import main
    from export.checkpoint import ExportError, export_run

    run = _fake_model(tmp_path, image_features="pooled")
    with pytest.raises(ExportError, match="pooled"):
        export_run(run, tmp_path / "out")
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    assert "image_features" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_run_and_existing_out(tmp_path, tiny_run):
    from export.checkpoint import export_run

    with pytest.raises(FileNotFoundError, match="neither a PhiClip folder"):
        export_run(tmp_path, tmp_path / "out")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(tiny_run, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    with pytest.raises(ValueError, match="must lie outside"):
        export_run(tiny_run, tiny_run / "export")


# --- the tiny run, exported ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    from phiclip_cli import main

    out = tmp_path_factory.mktemp("export") / "llava"
    assert main(["export", str(tiny_run), str(out)]) == 0
    return out


def test_export_layout_and_weight_names(exported, tiny_run):
    from safetensors import safe_open

    for name in ("config.json", "model.safetensors", "generation_config.json", "processor_config.json",
                 "preprocessor_config.json", "tokenizer.json", "chat_template.jinja", "phiclip_export.json"):
        assert (exported / name).is_file(), name
    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    prefixes = ("model.language_model.", "model.vision_tower.vision_model.", "model.multi_modal_projector.", "lm_head.")
    assert keys and all(k.startswith(prefixes) for k in keys), [k for k in keys if not k.startswith(prefixes)]
    assert any(k.startswith("model.vision_tower.vision_model.embeddings.") for k in keys)
    assert "lm_head.weight" not in keys  # the tiny LM ties it to the embeddings
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "quantization_config" not in config
    info = json.loads((exported / "phiclip_export.json").read_text())
    assert info["lora_merged"] is True and info["n_image_tokens"] == config["image_seq_length"]
    processor_config = json.loads((exported / "processor_config.json").read_text())
    assert processor_config["patch_size"] == config["vision_config"]["patch_size"]


FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, pipeline

    out, image_path, result_path = sys.argv[1:4]
    model, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(out)
    image = Image.open(image_path).convert("RGB")
    results = {"loading": {k: sorted(map(str, v)) for k, v in info.items()}}
    tensors = {}
    for name, content in (
        ("image", [{"type": "image"}, {"type": "text", "text": "Is it bright?"}]),
        ("text", [{"type": "text", "text": "Say hello."}]),
    ):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[image] if name == "image" else None, text=text, return_tensors="pt")
        with torch.no_grad():
            tensors[name] = model(**inputs).logits[0]
        results[name + "_ids"] = inputs["input_ids"][0].tolist()
    # lmms-eval's llava_hf renders string content "<image>" + newline + question with the tokenizer's template.
    lmms_text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\\nIs it bright?"}], tokenize=False, add_generation_prompt=True)
    image_text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it bright?"}]}],
        add_generation_prompt=True)
    results["lmms_style_same"] = lmms_text == image_text
    torch.save(tensors, result_path + ".pt")
    pipe = pipeline("image-text-to-text", model=out)
    messages = [{"role": "user", "content": [{"type": "image", "image": image_path},
                                             {"type": "text", "text": "Is it bright?"}]}]
    answer = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    results["pipeline"] = answer[0]["generated_text"]
    results["phiclip_imported"] = any(m == "phiclip" or m.startswith("phiclip.") for m in sys.modules)
    json.dump(results, open(result_path, "w"))
    """
)


def test_export_matches_run_in_fresh_process(exported, tiny_run, tmp_path):
    from chat.assistant import VisionChat

    image_path = write_image(tmp_path / "probe.png", seed=7, size=40)
    result_path = tmp_path / "fresh.json"
    env_python = [sys.executable, "-c", FRESH, str(exported), str(image_path), str(result_path)]
    proc = subprocess.run(env_python, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(result_path.read_text())
    fresh_logits = torch.load(str(result_path) + ".pt")
    assert fresh["phiclip_imported"] is False
    assert fresh["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert isinstance(fresh["pipeline"], str)
    assert fresh["lmms_style_same"] is True

    chat = VisionChat.load(tiny_run)
    image = Image.open(image_path).convert("RGB")
    cases = {
        "image": ([{"role": "user", "content": "Is it bright?"}], image),
        "text": ([{"role": "user", "content": "Say hello."}], None),
    }
    image_token = chat.processor.image_token_id
    for name, (messages, img) in cases.items():
        ids = chat.prompt_ids(messages, n_images=int(img is not None))
        expanded = [t for token in ids for t in [token] * (chat.n_image_tokens if token == image_token else 1)]
        assert fresh[name + "_ids"] == expanded, name
        inputs = {"input_ids": torch.tensor([ids])}
        if img is not None:
            inputs["pixel_values"] = chat.processor.image_pixels([img])
        with torch.no_grad():  # adapter enabled: the merged checkpoint always applies it
            logits = chat.model(**inputs).logits[0]
        vocab = logits.shape[-1]  # the export gives <image> a vocabulary row of its own
        diff = (logits - fresh_logits[name][:, :vocab]).abs().max().item()
        assert diff < ATOL, f"{name}: max |logit diff| {diff:.2e}"


def test_export_casts_to_the_requested_dtype(tiny_run, tmp_path):
    from export.checkpoint import export_run

    out = export_run(tiny_run, tmp_path / "out", dtype="bfloat16")
    info = json.loads((out / "phiclip_export.json").read_text())
    assert info["dtype"] == "bfloat16" and info["lora_merged"] is True
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {"BF16"}


def test_auto_dtype_is_the_lm_checkpoints_not_the_training_dtype(tiny_llama_dir, tiny_clip_dir, tmp_path):
    """A bf16 LM (Phi-3.5-mini is published so) trained on a CPU in float32: ``--dtype auto`` writes bf16, as the
    LM's own checkpoint is stored, not the float32 PhiClip's config records (twice the size at 3.8B)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.checkpoint import export_run
    from train.run import train

    lm = tmp_path / "lm-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(lm)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(lm)
    run = train(tiny_config(lm, tiny_clip_dir, make_toy_data(tmp_path), tmp_path / "run", max_steps=1))
    assert json.loads((run / "model" / "config.json").read_text())["text_config"]["dtype"] == "float32"
    out = export_run(run, tmp_path / "out")
    assert json.loads((out / "phiclip_export.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_checkpoint_names_round_trip(tmp_path, tower):
    """CLIP and SigLIP towers, tied and untied heads, sharded files: transformers reloads every weight."""
    from safetensors import safe_open
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Phi3Config,
        SiglipVisionConfig,
    )

    from export.checkpoint import checkpoint_state, write_safetensors

    torch.manual_seed(0)
    vision_args = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8}
    text_args = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
                     "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if tower == "clip":  # Llama with tied embeddings, CLS dropped
        tied, strategy = True, "default"
        vision, text = CLIPVisionConfig(**vision_args), LlamaConfig(**text_args, tie_word_embeddings=True)
    else:  # Phi-3 with its own lm_head, every token kept
        tied, strategy = False, "full"
        vision, text = SiglipVisionConfig(**vision_args), Phi3Config(**text_args, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=299, image_seq_length=16,
                         vision_feature_select_strategy=strategy, tie_word_embeddings=tied)
    model = LlavaForConditionalGeneration(config).eval()
    tensors, is_tied = checkpoint_state(model)
    assert is_tied is tied and ("lm_head.weight" in tensors) is not tied
    files = write_safetensors(tensors, tmp_path, shard_bytes=100_000)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    for file in files:
        with safe_open(str(tmp_path / file), "pt") as f:
            names = list(f.keys())
        assert not [k for k in names if k.startswith("model.vision_tower.") and ".vision_model." not in k]
    config.save_pretrained(tmp_path)
    loaded, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.tensor([[1, 2] + [299] * 16 + [3, 4]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pixels).logits
        got = loaded.eval()(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(expected, got, atol=1e-6)


def test_a_siglip_tower_as_it_ships_exports_with_its_own_image_settings(tmp_path, tiny_llama_dir):
    """A SigLIP tower with its own SiglipImageProcessor (exact resize, no crop settings): the exported
    LlavaImageProcessor writes no crop of its own, so its pixels are PhiClip's (before, it kept its default
    224 centre crop and the export refused the tower's token count)."""
    from transformers import AutoImageProcessor, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from chat.assistant import VisionChat
    from export.checkpoint import export_run
    from train.run import train

    torch.manual_seed(0)
    tower = tmp_path / "siglip"
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tower)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tower)
    cfg = tiny_config(tiny_llama_dir, tower, make_toy_data(tmp_path), tmp_path / "run", max_steps=1)
    cfg.model.vision_feature_select_strategy = "full"
    run = train(cfg)
    out = export_run(run, tmp_path / "llava")
    exported = AutoImageProcessor.from_pretrained(out)
    assert exported.do_center_crop is False
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (20, 50, 3), dtype=np.uint8))
    ours = VisionChat.load(run).processor.image_pixels([picture])
    theirs = exported(images=[picture], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
