"""GGUF export pieces that need no llama.cpp: the mmproj file, refusals, the chat templates, Modelfile and card.

The llama.cpp-driven checks are in test_gguf_llamacpp.py (``make test-gguf``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from configuration_phiclip import PhiClipConfig
from export import gguf_card, gguf_lm, mmproj
from export.gguf import export_gguf, file_names
from export.llamacpp import LLAMA_CPP_PYTHON_VERSION
from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import PhiClipProcessor


@pytest.fixture(scope="module")
def loaded(tiny_run):
    model = PhiClipForCausalLM.from_pretrained(tiny_run / "model", dtype=torch.float32, merge_adapter=True).eval()
    return model, PhiClipProcessor.from_pretrained(tiny_run / "model")


def _config(tiny_run, **changes) -> PhiClipConfig:
    config = PhiClipConfig.from_pretrained(tiny_run / "model")
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _read(path: Path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
               for t in reader.tensors}
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, tensors, types


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "named"), [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy 'full'"),
    ({"image_features": "pooled"}, "image_features is 'pooled'"),
    ({"vision_feature_layer": [-2, 1]}, "a layer listed twice"),
    ({"vision_feature_layer": 7}, "vision_feature_layer 7"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act 'relu'"),
])
def test_configs_llamacpp_cannot_run_are_refused_naming_the_setting(tiny_run, changes, named):
    with pytest.raises(mmproj.GGUFExportError, match=re.escape(named)):
        mmproj.plan_vision(_config(tiny_run, **changes))


def test_siglip_default_is_refused_and_full_is_exact(tiny_run):
    from transformers import SiglipVisionConfig

    config = _config(tiny_run)
    config.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8)
    with pytest.raises(mmproj.GGUFExportError, match="SigLIP tower: PhiClip drops the first patch"):
        mmproj.plan_vision(config)
    config.vision_feature_select_strategy = "full"
    plan = mmproj.plan_vision(config)
    assert plan.exact and not plan.has_class_token and plan.layers == (1,)


def test_clip_default_is_refused_unless_an_approximation_is_allowed(tiny_run):
    config = _config(tiny_run)
    assert config.vision_config.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "default"
    with pytest.raises(mmproj.GGUFExportError) as refused:
        mmproj.plan_vision(config)
    message = str(refused.value)
    assert "vision_feature_select_strategy 'default' with a CLIP tower" in message
    assert f"llama.cpp {LLAMA_CPP_PYTHON_VERSION}" in message and "keeps rows 1..N" in message
    assert "--allow-approximate-vision" in message and "SigLIP" in message and "'full'" in message
    plan = mmproj.plan_vision(config, allow_approximate=True)
    assert not plan.exact and plan.has_class_token
    assert plan.note.startswith("approximate") and "class token" in plan.note


def test_a_name_llama_cpp_reads_as_phi3_needs_phi3s_tokens():
    """llama.cpp looks up <s>, </s>, <unk> and <|endoftext|> by text for any model named like Phi-3; a Phi-3-layered
    LM with a BPE vocabulary (Phi-4-mini's shape) named so would not load."""
    from export.gguf import _check_name

    phi35 = {"<s>": 1, "</s>": 2, "<unk>": 0, "<|endoftext|>": 32000}
    _check_name("phiclip-phi3.5", phi35)
    _check_name("phiclip-mini", {"<|endoftext|>": 0})
    with pytest.raises(mmproj.GGUFExportError, match=r"name 'My-Phi-3-vision'.*lacks <s>, </s>, <unk>"):
        _check_name("My-Phi-3-vision", {"<|endoftext|>": 0})


def test_cli_flag_reaches_the_export_and_is_refused_for_other_formats(monkeypatch, capsys):
    import argparse

    import export.gguf
    from export import cli

    parser = argparse.ArgumentParser()
    cli.add_subparser(parser.add_subparsers())
    seen = {}

    def fake_export(source, out, **kwargs):
        seen.update(kwargs)
        raise mmproj.GGUFExportError("stop here")

    monkeypatch.setattr(export.gguf, "export_gguf", fake_export)
    args = parser.parse_args(["export", "run", "out", "--format", "gguf", "--allow-approximate-vision"])
    with pytest.raises(mmproj.GGUFExportError, match="stop here"):
        args.func(args)
    assert seen["allow_approximate_vision"] is True
    args = parser.parse_args(["export", "run", "out", "--format", "gguf"])
    with pytest.raises(mmproj.GGUFExportError):
        args.func(args)
    assert seen["allow_approximate_vision"] is False
    args = parser.parse_args(["export", "run", "out", "--allow-approximate-vision"])
    with pytest.raises(SystemExit, match="--allow-approximate-vision apply to --format gguf only"):
        args.func(args)


def test_refusals_happen_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    folder = tmp_path / "full"
    shutil.copytree(tiny_run / "model", folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(mmproj.GGUFExportError, match="vision_feature_select_strategy 'full'"):
        export_gguf(folder, tmp_path / "out", allow_approximate_vision=True)
    monkeypatch.setenv("PHICLIP_LLAMA_PYTHON", str(tmp_path / "no-such-python"))  # refused before llama.cpp is sought
    with pytest.raises(mmproj.GGUFExportError, match="'default' with a CLIP tower.*--allow-approximate-vision"):
        export_gguf(tiny_run, tmp_path / "out")
    with pytest.raises(mmproj.GGUFExportError, match="--quant q3_x"):
        export_gguf(tiny_run, tmp_path / "out", quants=["q8_0", "q3_x"], allow_approximate_vision=True)
    from export.llamacpp import LlamaCppError

    with pytest.raises(LlamaCppError, match="scripts/llamacpp_setup.sh"):
        export_gguf(tiny_run, tmp_path / "out", allow_approximate_vision=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- the mmproj file ---------------------------------------------------------------------------


def test_mmproj_holds_the_tower_projector_and_hyper_parameters(loaded, tmp_path):
    model, processor = loaded
    plan = mmproj.plan_vision(model.config, allow_approximate=True)
    path = mmproj.write_mmproj(model, processor.image_processor, tmp_path / "mmproj.gguf", name="t", plan=plan,
                               llama_cpp_version="0.3.36")
    fields, tensors, types = _read(path)
    vision = model.config.vision_config
    assert fields["general.architecture"] == "clip"
    assert fields["clip.projector_type"] == "mlp"
    assert fields["clip.has_vision_encoder"] is True and fields["clip.has_llava_projector"] is True
    assert fields["clip.use_gelu"] is False  # CLIP's quick_gelu
    assert fields["clip.vision.image_size"] == vision.image_size == 32
    assert fields["clip.vision.patch_size"] == vision.patch_size
    assert fields["clip.vision.embedding_length"] == vision.hidden_size
    assert fields["clip.vision.feed_forward_length"] == vision.intermediate_size
    assert fields["clip.vision.attention.head_count"] == vision.num_attention_heads
    assert fields["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(vision.layer_norm_eps)
    assert fields["clip.vision.feature_layer"] == [1]  # hidden state -2 of a 2-layer tower
    assert fields["clip.vision.block_count"] == 1
    assert fields["clip.vision.image_mean"] == pytest.approx(processor.image_processor.image_mean)
    assert fields["clip.vision.image_std"] == pytest.approx(processor.image_processor.image_std)

    tower = {k.removeprefix("vision_model."): v for k, v in model.vision_tower.state_dict().items()}

    def same(name, tensor):
        expected = tensor.float().numpy()
        assert tensors[name].shape == expected.shape, name
        np.testing.assert_allclose(tensors[name], expected, atol=2e-3, rtol=2e-3, err_msg=name)

    same("v.patch_embd.weight", tower["embeddings.patch_embedding.weight"])
    same("v.position_embd.weight", tower["embeddings.position_embedding.weight"][1:])  # no class token: p1..pN
    assert "v.class_embd" not in tensors
    same("v.pre_ln.weight", tower["pre_layrnorm.weight"])
    same("v.blk.0.attn_q.weight", tower["encoder.layers.0.self_attn.q_proj.weight"])
    same("v.blk.0.attn_out.bias", tower["encoder.layers.0.self_attn.out_proj.bias"])
    same("v.blk.0.ffn_up.weight", tower["encoder.layers.0.mlp.fc1.weight"])
    same("v.blk.0.ffn_down.weight", tower["encoder.layers.0.mlp.fc2.weight"])
    assert not any(name.startswith("v.blk.1.") for name in tensors)  # layer 2 is never read
    assert not any(name.startswith("v.post_ln") for name in tensors)
    same("mm.0.weight", model.projector.linear_1.weight.detach())
    same("mm.0.bias", model.projector.linear_1.bias.detach())
    same("mm.2.weight", model.projector.linear_2.weight.detach())
    same("mm.2.bias", model.projector.linear_2.bias.detach())
    assert types["v.blk.0.attn_q.weight"] == types["mm.0.weight"] == types["v.patch_embd.weight"] == "F16"
    assert types["v.blk.0.attn_q.bias"] == types["v.pre_ln.weight"] == "F32"


def test_siglip_mmproj_holds_every_patch_position_and_no_class_token(tiny_run, tmp_path):
    """The demo's case: a SigLIP tower (patch bias, no class token, no pre-norm, tanh GELU) with 'full'."""
    from transformers import CLIPImageProcessorPil, SiglipVisionConfig

    config = _config(tiny_run, vision_feature_select_strategy="full", vision_feature_layer=-1)
    config.vision_config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=32, patch_size=8,
                                              vision_use_head=False)
    torch.manual_seed(0)
    model = PhiClipForCausalLM(config).eval()
    plan = mmproj.plan_vision(config)
    assert plan.exact and plan.layers == (2,)
    image_processor = CLIPImageProcessorPil(image_mean=[0.48145466, 0.4578275, 0.40821073],
                                            image_std=[0.26862954, 0.26130258, 0.27577711])
    fields, tensors, _ = _read(mmproj.write_mmproj(model, image_processor, tmp_path / "m.gguf", name="s", plan=plan,
                                                   llama_cpp_version="0.3.36"))
    assert fields["clip.use_gelu"] is True  # gelu_pytorch_tanh: ggml's gelu
    assert fields["clip.vision.block_count"] == 2 and fields["clip.vision.feature_layer"] == [2]
    assert fields["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert fields["phiclip.vision_exact"] is True
    tower = {k.removeprefix("vision_model."): v for k, v in model.vision_tower.state_dict().items()}
    positions = tower["embeddings.position_embedding.weight"].numpy()
    assert positions.shape[0] == 16
    np.testing.assert_allclose(tensors["v.position_embd.weight"], positions, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(tensors["v.patch_embd.bias"], tower["embeddings.patch_embedding.bias"].numpy())
    assert "v.class_embd" not in tensors and "v.pre_ln.weight" not in tensors
    assert {"v.blk.1.attn_q.weight", "v.blk.1.ffn_down.weight"} <= set(tensors)
    assert not any(name.startswith("v.post_ln") for name in tensors)  # hidden_states[-1] is before post_layernorm


def test_class_token_plan_rotates_position_rows(loaded):
    model, _ = loaded
    plan = mmproj.plan_vision(model.config, allow_approximate=True)
    kept = mmproj.VisionPlan(plan.layers, plan.order, True, True, "class token kept")
    tensors = mmproj.mmproj_tensors(model, kept)
    positions = model.vision_tower.state_dict()
    rows = next(v for k, v in positions.items() if k.endswith("position_embedding.weight")).numpy()
    np.testing.assert_array_equal(tensors["v.position_embd.weight"], np.concatenate([rows[1:], rows[:1]]))
    assert "v.class_embd" in tensors


def test_several_feature_layers_are_stacked_in_llamacpp_order(tiny_run):
    config = _config(tiny_run, vision_feature_layer=[-1, 0])
    torch.manual_seed(0)
    model = PhiClipForCausalLM(config).eval()
    plan = mmproj.plan_vision(config, allow_approximate=True)
    assert plan.layers == (0, 2) and plan.order == (1, 0)
    tensors = mmproj.mmproj_tensors(model, plan)
    weight = model.projector.linear_1.weight.detach().numpy()
    width = config.vision_config.hidden_size
    np.testing.assert_array_equal(tensors["mm.0.weight"][:, :width], weight[:, width:])
    np.testing.assert_array_equal(tensors["mm.0.weight"][:, width:], weight[:, :width])
    assert {f"v.blk.{i}.ln1.weight" for i in (0, 1)} <= set(tensors)


def test_square_mlp_is_stored_as_llamacpp_will_unswap_it(tiny_run):
    config = _config(tiny_run)
    config.vision_config.intermediate_size = config.vision_config.hidden_size
    torch.manual_seed(0)
    model = PhiClipForCausalLM(config).eval()
    tensors = mmproj.mmproj_tensors(model, mmproj.plan_vision(config, allow_approximate=True))
    tower = {k.removeprefix("vision_model."): v for k, v in model.vision_tower.state_dict().items()}
    np.testing.assert_array_equal(tensors["v.blk.0.ffn_down.weight"], tower["encoder.layers.0.mlp.fc1.weight"])
    np.testing.assert_array_equal(tensors["v.blk.0.ffn_up.weight"], tower["encoder.layers.0.mlp.fc2.weight"])


# ---- chat template: llama.cpp's message shapes land where PhiClip puts <image> -------------------


def _jinja(template: str, messages: list[dict]) -> str:
    """Rendered as llama-cpp-python's MTMDChatHandler renders it."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


@pytest.mark.parametrize("marker", ["<__media__>", "<__media_x7Qz__>"])
def test_gguf_template_places_media_markers_as_phiclip_places_images(loaded, marker):
    _, processor = loaded
    template = gguf_lm.gguf_chat_template(processor.chat_template)
    phiclip = processor.render([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                             {"type": "text", "text": "Same colour?"}]},
                                {"role": "assistant", "content": "Yes."},
                                {"role": "user", "content": "And the shape?"}], add_generation_prompt=True)
    expected = phiclip.replace("<image>", marker)
    assert expected.count(f"{marker}\n") == 2
    handler_shape = [{"role": "user", "content": [{"type": "text", "text": marker}, {"type": "text", "text": marker},
                                                  {"type": "text", "text": "Same colour?"}]},
                     {"role": "assistant", "content": "Yes."},
                     {"role": "user", "content": "And the shape?"}]
    server_shape = [dict(handler_shape[0], content=f"{marker}{marker}Same colour?"), *handler_shape[1:]]
    assert _jinja(template, handler_shape) == expected
    assert _jinja(template, server_shape) == expected
    text_only = [{"role": "user", "content": "What is the capital of France?"}]
    assert _jinja(template, text_only) == processor.render(text_only, add_generation_prompt=True)


# ---- Ollama: Modelfile and its Go template -------------------------------------------------------


def _go_render(template: str, messages: list[dict]) -> str:
    """Render the Go-template subset ollama_template writes (range/if eq/else if/end, .Content, string constants)."""
    parts = re.split(r"(\{\{.*?\}\})", template)
    out: list[str] = []

    def run(i: int, message: dict | None, emit: bool) -> int:
        while i < len(parts):
            part = parts[i]
            action = part[2:-2].strip() if part.startswith("{{") else None
            if action is None:
                if emit:
                    out.append(part)
            elif action == "range .Messages":
                end = i
                for m in messages:
                    end = run(i + 1, m, emit)
                i = end
            elif action.startswith("if eq .Role"):
                taken = False
                want = re.findall(r'"(\w+)"', action)[0]
                cond = message["role"] == want
                i = run(i + 1, message, emit and cond)
                taken = cond
                while parts[i][2:-2].strip().startswith("else if"):
                    want = re.findall(r'"(\w+)"', parts[i])[0]
                    cond = not taken and message["role"] == want
                    i = run(i + 1, message, emit and cond)
                    taken = taken or cond
                if parts[i][2:-2].strip() != "end":
                    raise AssertionError(f"unexpected {parts[i]}")
            elif action in ("end",) or action.startswith("else"):
                return i
            elif action == ".Content":
                if emit:
                    out.append(message["content"])
            elif re.fullmatch(r'"[^"]*"', action):
                if emit:
                    out.append(action[1:-1])
            else:
                raise AssertionError(f"unexpected action {part}")
            i += 1
        return i

    run(0, None, True)
    return "".join(out)


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs of an Ollama Modelfile; triple-quoted arguments may span lines."""
    commands, lines = [], iter(text.splitlines())
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        command, _, arg = line.partition(" ")
        assert command.upper() in {"FROM", "ADAPTER", "TEMPLATE", "SYSTEM", "PARAMETER", "LICENSE", "MESSAGE"}, line
        if arg.startswith('"""'):
            body = arg[3:]
            while not body.endswith('"""'):
                body += "\n" + next(lines)
            arg = body[:-3]
        commands.append((command.upper(), arg))
    return commands


def test_modelfile_parses_and_its_template_renders_like_the_chat_template(loaded):
    _, processor = loaded
    turns = gguf_card.chat_turns(lambda messages, gen: processor.render(messages, add_generation_prompt=gen))
    text = gguf_card.modelfile("m-Q8_0.gguf", "mmproj-m-f16.gguf", turns, ["<|im_end|>"])
    commands = parse_modelfile(text)
    assert [arg for cmd, arg in commands if cmd == "FROM"] == ["./m-Q8_0.gguf", "./mmproj-m-f16.gguf"]
    assert ("PARAMETER", 'stop "<|im_end|>"') in commands
    assert ("PARAMETER", "temperature 0") in commands and ("PARAMETER", "repeat_penalty 1") in commands
    template = next(arg for cmd, arg in commands if cmd == "TEMPLATE")
    system = next(arg for cmd, arg in commands if cmd == "SYSTEM")
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What colour?"}]
    # Ollama puts the Modelfile's SYSTEM first when the conversation has none
    assert _go_render(template, [{"role": "system", "content": system}, *chat]) == processor.render(
        chat, add_generation_prompt=True)
    own = [{"role": "system", "content": "Be brief."}, *chat]
    assert _go_render(template, own) == processor.render(own, add_generation_prompt=True)


def test_text_only_modelfile_has_one_from_line(loaded):
    _, processor = loaded
    turns = gguf_card.chat_turns(lambda messages, gen: processor.render(messages, add_generation_prompt=gen))
    commands = parse_modelfile(gguf_card.modelfile("text-only/m-base-f16.gguf", None, turns, ["<|im_end|>"]))
    assert [arg for cmd, arg in commands if cmd == "FROM"] == ["./text-only/m-base-f16.gguf"]


# ---- names and card ----------------------------------------------------------------------------


def test_file_names_let_llama_server_pair_model_and_mmproj():
    names = file_names("demo", ["q8_0", "q4_k_m"])
    assert names["f16"] == "demo-f16.gguf" and names["q8_0"] == "demo-Q8_0.gguf"
    assert names["q4_k_m"] == "demo-Q4_K_M.gguf"
    # llama.cpp's -hf: a model file has no "mmproj" in its name; the mmproj is a sibling whose name holds it
    assert "mmproj" in names["mmproj"] and names["mmproj"].endswith(".gguf") and "/" not in names["mmproj"]
    assert all("mmproj" not in names[q] for q in ("f16", "q8_0", "q4_k_m"))
    # the default tags llama-server tries (Q4_K_M, then Q8_0) never pick a text-only file
    assert not re.search("(Q4_K_M|Q8_0)[.-]", names["base"] + names["lora"], re.I)


def test_card_names_files_commands_and_measured_figures():
    facts = gguf_card.CardFacts(
        repo_id="me/demo-GGUF", name="demo", lm_files={"demo-f16.gguf": 300 * 2**20, "demo-Q8_0.gguf": 150 * 2**20},
        mmproj_file="mmproj-demo-f16.gguf", mmproj_size=2**20, text_files={}, base_models=["HuggingFaceTB/x", "/tmp/t"],
        vision="approximate: class token left out", vision_exact=False, cosine_square=0.99812, cosine_wide=0.99345,
        image_aspect="pad", pad_colour=(127, 127, 127), llama_pad_colour=(122, 116, 104), image_size=64,
        n_image_tokens=16, llama_cpp_python="0.3.36", default_quant="q8_0")
    text = gguf_card.card(facts)
    assert "llama-server -hf me/demo-GGUF:Q8_0" in text
    assert "--mmproj mmproj-demo-f16.gguf" in text and "MTMDChatHandler" in text and "ollama create demo" in text
    assert "0.99812" in text and "0.99345" in text and "RGB (127, 127, 127) (llama.cpp: (122, 116, 104))" in text
    assert "  - HuggingFaceTB/x" in text and "/tmp/t" not in text
    assert "--no-repack" in text and "0.3.36" in text and "approximate" in text
    assert "--allow-approximate-vision" in text
    exact = gguf_card.card(gguf_card.CardFacts(**{**facts.__dict__, "vision": "exact", "vision_exact": True}))
    assert "llama.cpp computes exactly PhiClip's image features" in exact and "--allow-approximate-vision" not in exact


# ---- each family's chat template as an Ollama template -----------------------------------------

FAMILY_TURNS = {  # family -> None (its turns are read) or the reason the export refuses it
    "chatml": None, "phi3": None, "phi3.5": None, "llama3": None, "llama3.1": "writes an empty system block",
    "qwen2.5": None,
    "qwen3": None, "smollm3": None, "gemma2": "the chat template refuses this conversation",
    "mistral-nemo": "drops or rewrites message content",  # its system prompt only ever in a last user turn
}


@pytest.mark.parametrize("family", sorted(FAMILY_TURNS))
def test_each_familys_template_becomes_an_ollama_template_or_is_refused_by_name(family, smol_tokenizer_dir):
    from helpers import tokenizer_with_template
    from transformers import CLIPImageProcessor

    from processing_phiclip import TemplateError

    processor = PhiClipProcessor.from_parts(CLIPImageProcessor(), tokenizer_with_template(smol_tokenizer_dir, family))

    def render(messages, gen):
        return processor.render(messages, add_generation_prompt=gen)

    if FAMILY_TURNS[family] is not None:
        with pytest.raises((gguf_card.TemplateShapeError, TemplateError), match=FAMILY_TURNS[family]):
            gguf_card.chat_turns(render)
        return
    turns = gguf_card.chat_turns(render)
    template = gguf_card.ollama_template(turns)
    chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What colour?"}]
    own = [{"role": "system", "content": "Be brief."}, *chat]
    assert _go_render(template, own) == render(own, True)
    default = [{"role": "system", "content": turns.default_system}] if turns.default_system else []
    assert _go_render(template, [*default, *chat]) == render(chat, True)
