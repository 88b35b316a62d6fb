"""PhiClipForCausalLM: projector init, generation loop, routing, saving and strict loading."""

import shutil

import pytest
import torch
from helpers import transformers_log
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import TextIteratorStreamer

from chat.assistant import GenerationSettings, VisionChat, load_parts
from modeling_phiclip import PROJECTOR_FILE, PhiClipForCausalLM
from runtime.config import ModelConfig
from train.build import build_model


def _image(colour=(200, 30, 30)):
    return Image.new("RGB", (32, 32), colour)


def recompute_greedy(model: PhiClipForCausalLM, ids: torch.Tensor, pixels, n: int, eos: set[int]) -> list[int]:
    """The original recipe's loop: a full forward over the whole sequence for every new token (one row)."""
    new: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixels).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        if token in eos:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def _rows(out: torch.Tensor, prompt_length: int, eos: set[int]) -> list[list[int]]:
    rows = []
    for row in out[:, prompt_length:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row if stop is None else row[: stop + 1])
    return rows


def test_projector_init_is_deliberate_and_reproducible(tiny_llama_dir, tiny_clip_dir):
    cfg = ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir), projector_init_std=0.02)
    a = build_model(cfg).model.projector
    b = build_model(cfg).model.projector
    for la, lb in ((a.linear_1, b.linear_1), (a.linear_2, b.linear_2)):
        assert torch.equal(la.weight, lb.weight)
        assert torch.all(la.bias == 0)
        assert 0.015 < la.weight.std().item() < 0.025
    assert "gelu" in type(a.act).__name__.lower()


def test_phi3_assembles(tiny_phi3_dir, tiny_clip_dir):
    built = build_model(ModelConfig(lm=str(tiny_phi3_dir), vision=str(tiny_clip_dir)))
    assert built.model.config.text_config.model_type == "phi3"
    assert built.tokenizer.convert_tokens_to_ids("<image>") == built.model.config.image_token_id


@pytest.mark.parametrize("with_image", [True, False])
def test_cache_loop_equals_recompute_batched_and_alone(tiny_run, with_image):
    """Greedy tokens of generate() (KV cache, left-padded batch) equal a full recompute per token, row by row."""
    chat = VisionChat.load(tiny_run)
    model = chat.model
    eos = {chat.tokenizer.eos_token_id, chat.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    conversations = [[{"role": "user", "content": "Is it bright?"}],
                     [{"role": "user", "content": "Tell me, in a few more words than that, what you see here"}]]
    images = [_image(), _image((10, 10, 10))] if with_image else [None, None]
    inputs = chat.model_inputs(conversations, images)
    assert inputs["attention_mask"][0, 0] == 0  # the shorter row is left-padded
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=sorted(eos),
                         pad_token_id=chat.tokenizer.pad_token_id)
    batched = _rows(out, inputs["input_ids"].shape[1], eos)
    for row, (messages, image) in enumerate(zip(conversations, images)):
        alone = chat.model_inputs([messages], [image])
        single = _rows(model.generate(**alone, max_new_tokens=10, eos_token_id=sorted(eos)),
                       alone["input_ids"].shape[1], eos)[0]
        pixels = alone.get("pixel_values")
        with model.adapter_disabled() if not with_image else torch.no_grad():
            reference = recompute_greedy(model, alone["input_ids"], pixels, 10, eos)
        assert batched[row] == single == reference, row


def test_generate_returns_prompt_then_new_ids_and_stops_rows_independently(tiny_run):
    chat = VisionChat.load(tiny_run)
    inputs = chat.model_inputs([[{"role": "user", "content": "Is it bright?"}]] * 2, [_image(), _image((0, 0, 0))])
    free = chat.model.generate(**inputs, max_new_tokens=6)
    first = int(free[0, inputs["input_ids"].shape[1]])
    out = chat.model.generate(**inputs, max_new_tokens=6, eos_token_id=[first], pad_token_id=0)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert out[0, inputs["input_ids"].shape[1]] == first
    assert out[0, inputs["input_ids"].shape[1] + 1:].eq(0).all()  # row 0 stopped, padded after its EOS


def test_generation_knobs(tiny_run):
    chat = VisionChat.load(tiny_run)
    inputs = chat.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    n = inputs["input_ids"].shape[1]
    torch.manual_seed(3)
    a = chat.model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    b = chat.model.generate(**inputs, max_new_tokens=8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9)
    assert torch.equal(a, b)  # sampling is reproducible with a seed
    greedy = chat.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, repetition_penalty=1.0)
    penalised = chat.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, repetition_penalty=50.0)
    assert greedy.shape[1] == n + 8
    assert len(set(penalised[0, n:].tolist())) >= len(set(greedy[0, n:].tolist()))
    word = chat.tokenizer.decode(greedy[0, n + 2: n + 3])
    stopped = chat.model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, stop_strings=[word],
                                  tokenizer=chat.tokenizer)
    assert stopped.shape[1] <= n + 3
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        chat.model.generate(**inputs, bogus=1)
    with pytest.raises(ValueError, match="stop_strings needs the tokenizer"):
        chat.model.generate(**inputs, stop_strings=["x"])


def test_streamer_text_equals_returned_text(tiny_run):
    chat = VisionChat.load(tiny_run)
    messages = [{"role": "user", "content": "Is it bright?"}]
    settings = GenerationSettings(max_new_tokens=10)
    stream = chat.stream(messages, _image(), settings)
    pieces = list(stream)
    assert "".join(pieces).strip() == chat.answer(messages, _image(), settings) == stream.completion.text
    inputs = chat.model_inputs([messages], [_image()])
    streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = chat.model.generate(**inputs, max_new_tokens=10, streamer=streamer)
    new = chat.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "".join(streamer) == new


def test_text_only_answer_is_the_base_model(tiny_run):
    """Without an image the adapter is disabled, inside generate(): same answer as the untouched base LM."""
    chat = VisionChat.load(tiny_run)
    assert chat.model.has_adapter and chat.model.config.text_only_base_lm
    messages = [{"role": "user", "content": "Hello there"}]
    settings = GenerationSettings(max_new_tokens=8)
    routed = chat.answer(messages, None, settings)
    base = PhiClipForCausalLM.from_pretrained(tiny_run / "model", load_adapter=False)
    ids = torch.tensor([chat.prompt_ids(messages)])
    out = base.generate(input_ids=ids, **settings.kwargs())
    assert routed == chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    with torch.no_grad():
        adapted = chat.model(input_ids=ids).logits
        with chat.model.adapter_disabled():
            plain = chat.model(input_ids=ids).logits
    assert not torch.allclose(adapted, plain), "the trained adapter should change the LM"
    chat.model.config.text_only_base_lm = False  # the switch: text goes through the adapter too
    through_adapter = chat.model.generate(input_ids=ids, **settings.kwargs())
    expected = torch.cat([ids, adapted[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(through_adapter[:, : ids.shape[1] + 1], expected)


def test_save_load_gives_identical_logits_and_trained_weights(tiny_run, tiny_llama_dir, tiny_clip_dir):
    a, b = VisionChat.load(tiny_run), VisionChat.load(tiny_run / "model")
    inputs = a.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    with torch.no_grad():
        assert torch.equal(a.model(**inputs).logits, b.model(**inputs).logits)
    trained = load_file(str(tiny_run / "model" / PROJECTOR_FILE))
    fresh = build_model(ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir))).model.projector.state_dict()
    assert not torch.allclose(trained["linear_1.weight"], fresh["linear_1.weight"])


def test_loading_a_folder_warns_of_no_type_mismatch(tiny_run):
    """transformers once warned "a model of type `phiclip` ... a model of type ``" on every load."""
    with transformers_log("transformers.configuration_utils") as records:
        load_parts(tiny_run / "model")
    messages = [r.getMessage() for r in records]
    assert messages[0].startswith("probe")  # the hook sees transformers' records
    assert not [m for m in messages if "to instantiate a model of type" in m]


def test_merge_adapter_gives_the_same_logits(tiny_run):
    chat = VisionChat.load(tiny_run)
    merged = PhiClipForCausalLM.from_pretrained(tiny_run / "model", merge_adapter=True)
    assert not merged.has_adapter
    inputs = chat.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    with torch.no_grad():
        assert torch.allclose(chat.model(**inputs).logits, merged(**inputs).logits, atol=1e-4)


def test_mismatched_projector_is_refused_with_its_file(tiny_run, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_run / "model", broken)
    good = load_file(str(broken / PROJECTOR_FILE))
    state = dict(good, **{"linear_1.weight": good["linear_1.weight"][:, :-1].contiguous()})
    save_file(state, str(broken / PROJECTOR_FILE))
    with pytest.raises(ValueError, match=rf"(?s){PROJECTOR_FILE}: projector weights do not match.*size mismatch"):
        PhiClipForCausalLM.from_pretrained(broken)
    save_file({k: v for k, v in good.items() if k != "linear_2.bias"}, str(broken / PROJECTOR_FILE))
    with pytest.raises(ValueError, match="Missing key"):
        PhiClipForCausalLM.from_pretrained(broken)
    save_file(dict(good, extra=torch.zeros(1)), str(broken / PROJECTOR_FILE))
    with pytest.raises(ValueError, match="Unexpected key"):
        PhiClipForCausalLM.from_pretrained(broken)
    (broken / PROJECTOR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="projector weights missing"):
        PhiClipForCausalLM.from_pretrained(broken)


def test_missing_adapter_is_an_error(tiny_run, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_run / "model", broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises((ValueError, OSError), match="adapter"):
        PhiClipForCausalLM.from_pretrained(broken)


def test_qlora_base_loads_and_answers(tiny_run):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = PhiClipForCausalLM.from_pretrained(tiny_run / "model", quantization_config=quant, device_map="cpu")
    assert "Linear4bit" in {type(m).__name__ for m in model.modules()}
    chat = VisionChat(model, VisionChat.load(tiny_run).processor)
    completion = chat.complete([[{"role": "user", "content": "Is it bright?"}]], [_image()],
                               GenerationSettings(max_new_tokens=4))[0]
    assert completion.token_ids and completion.finish_reason in ("stop", "length")


def test_dtype_and_attention_settings_are_honoured(tiny_run):
    model = PhiClipForCausalLM.from_pretrained(tiny_run / "model", dtype=torch.bfloat16, attn_implementation="eager")
    assert model.projector.linear_1.weight.dtype == torch.bfloat16
    assert next(model.vision_tower.parameters()).dtype == torch.bfloat16
    assert model.language_model.get_base_model().config._attn_implementation == "eager"


def test_pooled_single_token_variant_trains_and_reloads(tmp_path, tiny_llama_dir):
    """The original recipe's variant: CLIP's projected embedding as one image token."""
    from helpers import make_toy_data, tiny_config
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

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
    assert built.model.projector.linear_1.in_features == 24
    run = train(cfg)
    chat_a, chat_b = VisionChat.load(run), VisionChat.load(run)
    inputs = chat_a.model_inputs([[{"role": "user", "content": "Is it bright?"}]], [_image()])
    with torch.no_grad():
        assert torch.equal(chat_a.model(**inputs).logits, chat_b.model(**inputs).logits)
    assert isinstance(chat_a.answer([{"role": "user", "content": "Is it bright?"}], _image(),
                                    GenerationSettings(max_new_tokens=4)), str)
