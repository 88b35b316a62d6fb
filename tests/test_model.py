"""Assembly of the Llava model: image-token count, projector, save/load, generate."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from train.config import ModelConfig
from chat.assistant import GenerationSettings, VisionChat
from train.build import build_model
from train.weights import PROJECTOR_FILE, load_trainable


@pytest.mark.parametrize(
    "layer, strategy, expected",
    [(-2, "default", 16), (-2, "full", 17), ([-3, -1], "default", 16), (0, "full", 17)],
)
def test_image_tokens_follow_the_tower(tiny_llama_dir, tiny_clip_dir, layer, strategy, expected):
    """32x32 images, 8x8 patches: 16 patches, plus CLS with the "full" strategy."""
    cfg = ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir), vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy)
    built = build_model(cfg)
    assert built.n_image_tokens == expected
    n_layers = 1 if isinstance(layer, int) else len(layer)
    assert built.model.model.multi_modal_projector.linear_1.in_features == 32 * n_layers
    ids = torch.tensor([[1] + [built.image_token_id] * expected + [2]])
    pixels = torch.rand(1, 3, 32, 32)
    out = built.model(input_ids=ids, pixel_values=pixels)
    assert out.logits.shape[:2] == (1, expected + 2)


def test_projector_init_is_deliberate_and_reproducible(tiny_llama_dir, tiny_clip_dir):
    cfg = ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir), projector_init_std=0.02)
    a = build_model(cfg).model.model.multi_modal_projector
    b = build_model(cfg).model.model.multi_modal_projector
    for la, lb in ((a.linear_1, b.linear_1), (a.linear_2, b.linear_2)):
        assert torch.equal(la.weight, lb.weight)
        assert torch.all(la.bias == 0)
        assert 0.015 < la.weight.std().item() < 0.025
    assert isinstance(a.act, torch.nn.GELU) or "gelu" in type(a.act).__name__.lower()


def test_phi3_assembles(tiny_phi3_dir, tiny_clip_dir):
    built = build_model(ModelConfig(lm=str(tiny_phi3_dir), vision=str(tiny_clip_dir)))
    assert built.model.config.text_config.model_type == "phi3"
    assert built.tokenizer.convert_tokens_to_ids("<image>") == built.image_token_id


def _image():
    return Image.new("RGB", (32, 32), (200, 30, 30))


def test_save_load_gives_identical_logits(tiny_run):
    chat_a = VisionChat.from_run(tiny_run)
    chat_b = VisionChat.from_run(tiny_run)
    inputs = chat_a.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    with torch.no_grad():
        la = chat_a.model(**inputs).logits
        lb = chat_b.model(**inputs).logits
    assert torch.equal(la, lb)
    # and the trained weights are really there: a fresh (untrained) projector differs
    trained = load_file(str(tiny_run / PROJECTOR_FILE))
    fresh = build_model(chat_a.config.model).model.model.multi_modal_projector.state_dict()
    assert not torch.allclose(trained["linear_1.weight"], fresh["linear_1.weight"])


def test_mismatched_projector_is_an_error(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    state = load_file(str(broken / PROJECTOR_FILE))
    state["linear_1.weight"] = state["linear_1.weight"][:, :-1].contiguous()
    save_file(state, str(broken / PROJECTOR_FILE))
    with pytest.raises(ValueError, match="projector weights do not match"):
        VisionChat.from_run(broken)
    del state["linear_2.bias"]
    state["linear_1.weight"] = load_file(str(tiny_run / PROJECTOR_FILE))["linear_1.weight"]
    save_file(state, str(broken / PROJECTOR_FILE))
    with pytest.raises(ValueError, match="Missing key"):
        VisionChat.from_run(broken)


def test_missing_adapter_is_an_error(tiny_run, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(tiny_run, broken)
    chat = VisionChat.from_run(broken)
    shutil.rmtree(broken / "adapter" )
    with pytest.raises(FileNotFoundError, match="adapter missing"):
        load_trainable(chat.model, broken)


def test_generate_with_cache_equals_without(tiny_run):
    chat = VisionChat.from_run(tiny_run)
    inputs = chat.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    settings = GenerationSettings(max_new_tokens=12).kwargs()
    with torch.no_grad():
        cached = chat.model.generate(**inputs, **settings, use_cache=True, pad_token_id=0)
        uncached = chat.model.generate(**inputs, **settings, use_cache=False, pad_token_id=0)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 12 or cached.shape == uncached.shape
    assert torch.equal(cached, uncached)


def test_text_only_answer_is_the_base_model(tiny_run):
    """Without an image the adapter is disabled: same answer as the untouched base LM."""
    chat = VisionChat.from_run(tiny_run)
    messages = [{"role": "user", "content": "Hello there"}]
    settings = GenerationSettings(max_new_tokens=8)
    routed = chat.answer(messages, None, settings)
    base = build_model(chat.config.model)
    ids = torch.tensor([chat.prompt_ids(messages, with_image=False)])
    with torch.no_grad():
        out = base.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings.kwargs(),
                                  pad_token_id=chat.tokenizer.pad_token_id)
    expected = chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert routed == expected
    with torch.no_grad():
        adapted = chat.model(input_ids=ids).logits
        with chat.model.disable_adapter():
            plain = chat.model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain), "the trained adapter should change the LM"


def test_stream_reassembles_to_answer(tiny_run):
    chat = VisionChat.from_run(tiny_run)
    messages = [{"role": "user", "content": "Is it bright?"}]
    settings = GenerationSettings(max_new_tokens=10)
    pieces = list(chat.stream(messages, _image(), settings))
    assert len(pieces) >= 1
    assert "".join(pieces).strip() == chat.answer(messages, _image(), settings)


def test_pooled_single_token_variant_trains_and_reloads(tmp_path, tiny_llama_dir):
    """The original recipe's variant: CLIP's projected embedding as one image token."""
    from helpers import make_toy_data, tiny_config
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from train.run import train

    torch.manual_seed(1)
    clip = tmp_path / "clip-with-projection"
    CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=24,
    )).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    cfg = tiny_config(tiny_llama_dir, clip, make_toy_data(tmp_path), tmp_path / "run", max_steps=2)
    cfg.model.image_features = "pooled"
    built = build_model(cfg.model)
    assert built.n_image_tokens == 1
    assert built.model.model.multi_modal_projector.linear_1.in_features == 24
    run = train(cfg)
    chat_a, chat_b = VisionChat.from_run(run), VisionChat.from_run(run)
    inputs = chat_a.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    assert (inputs["input_ids"] == built.image_token_id).sum() == 1
    with torch.no_grad():
        assert torch.equal(chat_a.model(**inputs).logits, chat_b.model(**inputs).logits)
    assert isinstance(chat_a.answer([{"role": "user", "content": "Is it bright?"}], _image(),
                                    GenerationSettings(max_new_tokens=4)), str)
