"""``phiclip export --format vllm-lora``: base-LM Llava checkpoint + LoRA adapter named for vLLM's Llava.

The served routes themselves (vLLM with ``--enable-lora``) are checked in ``tests/test_vllm.py``
(``make test-vllm``); here the folder's layout, the adapter's names (checked by loading it with
PEFT onto transformers' Llava, the layout vLLM maps from), the refusals and the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import phiclip_logits, write_image
from PIL import Image

ATOL = 1e-4


@pytest.fixture(scope="module")
def vllm_lora_export(tiny_run, tmp_path_factory) -> tuple[Path, str]:
    from phiclip_cli import main

    out = tmp_path_factory.mktemp("vllm-lora") / "tiny-vllm"
    assert main(["export", str(tiny_run), str(out), "--format", "vllm-lora", "--name", "tiny"]) == 0
    return out


def test_max_lora_rank_is_one_vllm_accepts():
    from export.checkpoint import ExportError
    from export.vllm_lora import vllm_max_lora_rank

    assert [vllm_max_lora_rank(r) for r in (1, 2, 4, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 8, 16, 16, 32, 320, 512]
    with pytest.raises(ExportError, match="513"):
        vllm_max_lora_rank(513)


def test_layout_names_and_unmerged_base(vllm_lora_export, tiny_run):
    from safetensors import safe_open

    from chat.assistant import load_parts

    out = vllm_lora_export
    for name in ("config.json", "model.safetensors", "processor_config.json", "chat_template.jinja", "README.md",
                 "phiclip_export.json", "lora/adapter_config.json", "lora/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    info = json.loads((out / "phiclip_export.json").read_text())
    assert info["lora_merged"] is False and info["lora_rank"] == 4 and info["max_lora_rank"] == 8
    assert info["served_names"] == {"image": "tiny-image", "text": "tiny-text"}
    card = (out / "README.md").read_text()
    assert "`tiny-image`" in card and "`tiny-text`" in card and "--max-lora-rank 8" in card

    with safe_open(str(tiny_run / "model" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        trained = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    with safe_open(str(out / "lora" / "adapter_model.safetensors"), "pt") as f:
        written = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert len(written) == len(trained) > 0
    prefix = "base_model.model.model.language_model.layers."
    assert all(k.startswith(prefix) for k in written), [k for k in written if not k.startswith(prefix)][:3]
    for key, tensor in trained.items():
        renamed = key.replace("base_model.model.model.", "base_model.model.model.language_model.", 1)
        assert torch.equal(written[renamed], tensor), key

    # The checkpoint's LM is the base one: its weights equal PhiClip's LM without the adapter.
    base, _ = load_parts(tiny_run, dtype=torch.float32, load_adapter=False)
    lm_state = base.language_model.model.state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight"):
            assert torch.equal(f.get_tensor("model.language_model." + key), lm_state[key]), key


def test_routes_on_transformers_match_phiclip(vllm_lora_export, tiny_run, tmp_path):
    """The folder loads as Llava (text route) and, with PEFT, as Llava + adapter (image route), equal to PhiClip."""
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from chat.assistant import VisionChat

    out = vllm_lora_export
    chat = VisionChat.load(tiny_run)
    image = Image.open(write_image(tmp_path / "probe.png", seed=7, size=40)).convert("RGB")
    processor = AutoProcessor.from_pretrained(out)
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()

    def llava_logits(model, content, img):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[img] if img is not None else None, text=text, return_tensors="pt")
        with torch.no_grad():
            return inputs["input_ids"][0].tolist(), model(**inputs).logits[0]

    image_content = [{"type": "image"}, {"type": "text", "text": "Is it bright?"}]
    text_ids, text_logits = llava_logits(llava, [{"type": "text", "text": "Say hello."}], None)
    _, image_logits_base = llava_logits(llava, image_content, image)
    routed = PeftModel.from_pretrained(llava, str(out / "lora")).eval()
    lora_modules = [n for n, m in routed.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert lora_modules and all(".language_model." in n for n in lora_modules), lora_modules[:3]
    image_ids, image_logits = llava_logits(routed, image_content, image)

    want_text_ids, want_text = phiclip_logits(chat, [{"role": "user", "content": "Say hello."}], None, adapter=False)
    want_image_ids, want_image = phiclip_logits(chat, [{"role": "user", "content": "Is it bright?"}], image, True)
    _, phiclip_image_base = phiclip_logits(chat, [{"role": "user", "content": "Is it bright?"}], image, False)
    assert text_ids == want_text_ids and image_ids == want_image_ids
    vocab = want_text.shape[-1]  # the export gives <image> a vocabulary row of its own
    assert (text_logits[:, :vocab] - want_text).abs().max() < ATOL
    assert (image_logits[:, :vocab] - want_image).abs().max() < ATOL
    assert (image_logits_base[:, :vocab] - phiclip_image_base).abs().max() < ATOL
    # The check can fail: the adapter moves the image logits far more than the tolerance.
    assert (want_image - phiclip_image_base).abs().max() > 100 * ATOL


def test_refusals(tiny_run, tmp_path):
    from export.checkpoint import ExportError
    from export.vllm_lora import export_vllm_lora, llava_adapter
    from phiclip_cli import main

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run / "model" / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for field, value in (("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"),
                         ("init_lora_weights", "pissa")):
        (adapter / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(ExportError, match=field):
            llava_adapter(adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match="lm_head"):
        llava_adapter(adapter)

    no_adapter = tmp_path / "no-adapter"
    shutil.copytree(tiny_run / "model", no_adapter)
    shutil.rmtree(no_adapter / "adapter")
    settings = json.loads((no_adapter / "config.json").read_text())
    (no_adapter / "config.json").write_text(json.dumps({**settings, "adapter_subfolder": None}))
    with pytest.raises(ExportError, match="no LoRA adapter"):
        export_vllm_lora(no_adapter, tmp_path / "out")
    with pytest.raises(SystemExit, match="gguf only"):
        main(["export", str(tiny_run), str(tmp_path / "out"), "--format", "vllm-lora", "--quant", "q8_0"])
    assert not (tmp_path / "out").exists()


def test_cli_prints_the_vllm_command(tiny_run, tmp_path, capsys):
    from phiclip_cli import main

    out = tmp_path / "served"
    assert main(["export", str(tiny_run), str(out), "--format", "vllm-lora"]) == 0
    printed = capsys.readouterr().out
    name = tiny_run.name
    assert f"vllm serve {out.resolve()} --served-model-name {name}-text --enable-lora " \
           f"--lora-modules {name}-image={out.resolve() / 'lora'} --max-lora-rank 8 --max-loras 2" in printed
    assert f'image questions -> model "{name}-image", text-only questions -> model "{name}-text"' in printed
