"""PhiClipProcessor: prompts rendered and tokenized exactly as training does, content parts, batches, padding."""

import pytest
from helpers import tokenizer_with_template
from PIL import Image

from processing_phiclip import PhiClipProcessor


def encode_prompt(processor, messages):
    """The training prompt's ids: LLaVA-record messages (``<image>`` markers) up to the generation prompt."""
    return processor.encode_chat(messages, add_generation_prompt=True, image_markers=True)[0]


@pytest.fixture(params=["chatml", "phi3", "llama3"])
def processor(request, smol_tokenizer_dir, tiny_clip_dir):
    from transformers import AutoImageProcessor

    tok = tokenizer_with_template(smol_tokenizer_dir, request.param)
    return PhiClipProcessor.from_parts(AutoImageProcessor.from_pretrained(tiny_clip_dir), tok, "Answer briefly.")


def _image():
    return Image.new("RGB", (40, 40), (200, 30, 30))


def test_question_with_image_is_the_training_prompt(processor):
    expected = encode_prompt(processor, [{"role": "user", "content": "<image>\nWhat colour is it?"}])
    string_form = processor(images=_image(), text="What colour is it?")["input_ids"][0]
    parts = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                          {"type": "image", "image": _image()}]}]
    chat_form = processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert list(string_form) == expected == list(chat_form["input_ids"][0])
    assert expected.count(processor.image_token_id) == 1
    assert "Answer briefly." in processor.decode(expected)


def test_multi_turn_history_matches_training(processor):
    messages = [{"role": "user", "content": "<image>\nWhat colour is it?"}, {"role": "assistant", "content": "Red."},
                {"role": "user", "content": "And the shape?"}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(images=_image(), text=rendered)["input_ids"][0]
    assert list(ids) == encode_prompt(processor, messages)


def test_batch_is_left_padded_and_images_follow_their_texts(processor):
    batch = processor(images=[_image(), Image.new("RGB", (40, 40))], text=["Colour?", "What is in the picture here?"],
                      return_tensors="pt")
    assert batch["pixel_values"].shape[0] == 2
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()
    assert (batch["input_ids"] == processor.image_token_id).sum(1).tolist() == [1, 1]


def test_marker_and_image_counts_must_agree(processor):
    with pytest.raises(ValueError, match=r"text 0: 2 <image> token\(s\) but 1 image"):
        processor(images=[_image()], text="<image><image> two?")
    with pytest.raises(ValueError, match="text is required"):
        processor(images=[_image()])


def test_post_process_decodes_rows(processor):
    ids = processor(text=["hello there"], return_tensors="pt")["input_ids"]
    assert processor.post_process_image_text_to_text(ids) == [processor.decode(ids[0], skip_special_tokens=True)]


# Phi-3's tokenizer.json (legacy Llama-2 pipeline): a word boundary before every text piece, specials included.
_PHI3_LEGACY = {"normalizer": {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None}


@pytest.fixture(scope="module", params=["metaspace-first", "phi3-legacy"])
def sentencepiece_processor(request, tmp_path_factory, tiny_clip_dir):
    """A SentencePiece BPE tokenizer with Phi-3.5's added tokens and template, as transformers 5 converts one
    (Metaspace, ``prepend_scheme: first``: Mistral v0.3's pipeline) or with Phi-3's published legacy pipeline."""
    import json

    from transformers import AutoImageProcessor, AutoTokenizer

    from benchmarks.reference_shapes import parts, write_tokenizer

    folder = write_tokenizer(parts("small"), tmp_path_factory.mktemp("spm"))
    if request.param == "phi3-legacy":  # transformers 5's LlamaTokenizer builds its own pipeline: load the file's
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec.update(_PHI3_LEGACY)
        (folder / "tokenizer.json").write_text(json.dumps(spec))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert ("Prepend" in str(tokenizer.backend_tokenizer.normalizer)) == (request.param == "phi3-legacy")
    return PhiClipProcessor.from_parts(AutoImageProcessor.from_pretrained(tiny_clip_dir), tokenizer)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "<image>\nWhat colour is it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello, how can I help?"}, {"role": "user", "content": "<image>\nAnd this one?"}],
])
def test_sentencepiece_prompts_are_what_the_tokenizer_gives_the_whole_string(sentencepiece_processor, messages):
    """Exports, vLLM and llama.cpp tokenize the rendered prompt as one string: PhiClip's ids must be those
    (a Metaspace tokenizer marks only its input's start; tokenizing each piece alone added a "▁" after every
    special token and image)."""
    processor = sentencepiece_processor
    rendered = processor.render(messages, add_generation_prompt=True)
    whole = processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert encode_prompt(processor, messages) == whole
    n_images = rendered.count(processor.image_token)
    called = processor(images=[_image()] * n_images, text=rendered)["input_ids"][0]
    assert list(called) == whole
