"""generate(): each GenerationConfig setting is honoured as transformers honours it, or refused by name.

Text-only rows run on the base LM, so for them PhiClip's generate() must give what transformers'
own generate() gives on that LM: the same ids, scores and logits, greedy, sampled (same seed) and
beam search. Image rows are checked against a brute-force beam search and against themselves
alone: a batch that mixes image rows and text-only rows answers each row as it would alone.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TextStreamer,
    WatermarkingConfig,
)

from modeling_phiclip import PhiClipForCausalLM

QUESTIONS = ["Is it bright?", "Tell me, in a few more words than that, what you see here", "Hi", "What colour?"]
NEW = 8


class Loaded:
    """The tiny run's PhiClip (trained projector and LoRA adapter), its tokenizer and prompt builders."""

    def __init__(self, folder) -> None:
        self.model = PhiClipForCausalLM.from_pretrained(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.pad = self.tokenizer.pad_token_id
        self.eos = self.tokenizer.eos_token_id

    def prompt(self, question: str, image: bool) -> list[int]:
        """The chat prompt's ids; an image row has the image marker right after ``<|im_start|>user\\n``."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids[:3] + [self.model.config.image_token_id] + ids[3:] if image else ids

    def batch(self, rows: list[tuple[str, bool]], seed: int = 0) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids`` / ``attention_mask``, and ``pixel_values`` (one random image per image row)."""
        ids = [self.prompt(question, image) for question, image in rows]
        longest = max(map(len, ids))
        out = {
            "input_ids": torch.tensor([[self.pad] * (longest - len(r)) + r for r in ids]),
            "attention_mask": torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in ids]),
        }
        n_images = sum(image for _, image in rows)
        if n_images:
            size = self.model.config.vision_config.image_size
            out["pixel_values"] = torch.rand(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
        return out

    def base_lm_generate(self, inputs: dict, **settings):
        """transformers' own generate() on the base LM (adapter off): the reference for text-only rows."""
        with self.model.adapter_disabled():
            return self.model.language_model.get_base_model().generate(**inputs, **settings)


@pytest.fixture(scope="module")
def loaded(tiny_run) -> Loaded:
    return Loaded(tiny_run / "model")


def _new_rows(sequences: torch.Tensor, prompt_length: int) -> list[list[int]]:
    return sequences[:, prompt_length:].tolist()


def _greedy(loaded: Loaded, inputs: dict) -> list[list[int]]:
    out = loaded.model.generate(**inputs, max_new_tokens=NEW, pad_token_id=loaded.pad, eos_token_id=loaded.eos)
    return _new_rows(out, inputs["input_ids"].shape[1])


# Settings as functions of the plain greedy answer's first row and the prompt length, so that each can change it.
GREEDY_SETTINGS = {
    "plain": (lambda g, p: {}, False),
    "num_beams=1": (lambda g, p: {"num_beams": 1}, False),
    "no_repeat_ngram_size": (lambda g, p: {"no_repeat_ngram_size": 1}, True),
    "repetition_penalty": (lambda g, p: {"repetition_penalty": 3.0}, True),
    "bad_words_ids": (lambda g, p: {"bad_words_ids": [[g[0]], [g[1], g[2]]]}, True),
    "sequence_bias": (lambda g, p: {"sequence_bias": [[[g[0]], -20.0], [[42], 20.0]]}, True),
    "suppress_tokens": (lambda g, p: {"suppress_tokens": [g[0], g[1]]}, True),
    "begin_suppress_tokens": (lambda g, p: {"begin_suppress_tokens": [g[0]]}, True),
    "forced_bos_token_id": (lambda g, p: {"forced_bos_token_id": 42}, False),  # decoder-only: only for a 1-id prompt
    "forced_eos_token_id": (lambda g, p: {"forced_eos_token_id": 42}, True),
    "exponential_decay_length_penalty": (lambda g, p: {"exponential_decay_length_penalty": (2, 3.0),
                                                       "eos_token_id": [42]}, True),
    "min_new_tokens": (lambda g, p: {"min_new_tokens": 5, "eos_token_id": [g[2]]}, True),
    "min_length": (lambda g, p: {"min_length": p + 5, "max_new_tokens": None, "max_length": p + NEW,
                                 "eos_token_id": [g[2]]}, True),
    "remove_invalid_values": (lambda g, p: {"remove_invalid_values": True}, False),
    "renormalize_logits": (lambda g, p: {"renormalize_logits": True, "repetition_penalty": 3.0}, True),
    "watermarking_config": (lambda g, p: {"watermarking_config": WatermarkingConfig(bias=50.0)}, True),
    "max_time": (lambda g, p: {"max_time": 60.0}, False),
}
SAMPLED_SETTINGS = {
    "temperature": {"temperature": 0.7},
    "top_k top_p": {"top_k": 10, "top_p": 0.9},
    "min_p": {"min_p": 0.05},
    "typical_p": {"typical_p": 0.5},
    "epsilon_cutoff": {"epsilon_cutoff": 3e-5},
    "eta_cutoff": {"eta_cutoff": 1e-3},
    "num_return_sequences": {"num_return_sequences": 3, "temperature": 1.5},
}
OUTPUTS = {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}


def _assert_same_output(ours, theirs) -> None:
    assert ours.sequences.tolist() == theirs.sequences.tolist()
    for name in ("scores", "logits"):
        assert len(getattr(ours, name)) == len(getattr(theirs, name)), name
        for step, (a, b) in enumerate(zip(getattr(ours, name), getattr(theirs, name))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, name=name, step=step: f"{name}[{step}]: {m}")


@pytest.mark.parametrize("name", list(GREEDY_SETTINGS))
def test_greedy_settings_on_text_rows_equal_transformers_on_the_base_lm(loaded, name):
    """Two left-padded text-only rows: the same new ids, per-step scores and logits as LM.generate()."""
    inputs = loaded.batch([(QUESTIONS[0], False), (QUESTIONS[1], False)])
    plain = _greedy(loaded, inputs)
    make, changes = GREEDY_SETTINGS[name]
    settings = {"max_new_tokens": NEW, "pad_token_id": loaded.pad, "eos_token_id": loaded.eos,
                **make(plain[0], inputs["input_ids"].shape[1]), **OUTPUTS}
    ours = loaded.model.generate(**inputs, **settings)
    _assert_same_output(ours, loaded.base_lm_generate(inputs, do_sample=False, **settings))
    assert len(ours.scores) == ours.sequences.shape[1] - inputs["input_ids"].shape[1]
    if changes:  # the setting took effect: other ids, or other scores for the same ones
        before = loaded.model.generate(**inputs, max_new_tokens=NEW, pad_token_id=loaded.pad,
                                       eos_token_id=settings["eos_token_id"], **OUTPUTS)
        assert not torch.equal(ours.sequences, before.sequences) or not all(
            torch.equal(a, b) for a, b in zip(ours.scores, before.scores))


@pytest.mark.parametrize("name", list(SAMPLED_SETTINGS))
def test_sampling_settings_on_text_rows_equal_transformers_on_the_base_lm(loaded, name):
    """Same seed, same samples: the warpers are transformers' own, in its order, over the same rows."""
    inputs = loaded.batch([(QUESTIONS[0], False), (QUESTIONS[1], False)])
    settings = {"max_new_tokens": NEW, "pad_token_id": loaded.pad, "eos_token_id": loaded.eos, "do_sample": True,
                **SAMPLED_SETTINGS[name], **OUTPUTS}
    torch.manual_seed(7)
    ours = loaded.model.generate(**inputs, **settings)
    torch.manual_seed(7)
    _assert_same_output(ours, loaded.base_lm_generate(inputs, **settings))
    assert ours.sequences.shape[0] == 2 * settings.get("num_return_sequences", 1)


@pytest.mark.parametrize("length_penalty, early_stopping", [(1.0, False), (0.0, True), (2.0, "never"), (-1.0, False)])
def test_beam_search_on_text_rows_equals_transformers_on_the_base_lm(loaded, length_penalty, early_stopping):
    """Sequences, sequence scores, per-step scores and beam indices of LM.generate(num_beams=4)."""
    inputs = loaded.batch([(QUESTIONS[0], False), (QUESTIONS[1], False)])
    plain = _greedy(loaded, inputs)
    settings = {"num_beams": 4, "num_return_sequences": 2, "length_penalty": length_penalty,
                "early_stopping": early_stopping, "max_new_tokens": NEW, "pad_token_id": loaded.pad,
                # frequent tokens as EOS, so that hypotheses finish at different lengths
                "eos_token_id": [plain[0][1], plain[1][3]], **OUTPUTS}
    ours = loaded.model.generate(**inputs, **settings)
    theirs = loaded.base_lm_generate(inputs, do_sample=False, **settings)
    _assert_same_output(ours, theirs)
    torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
    assert ours.beam_indices.tolist() == theirs.beam_indices.tolist()
    assert ours.sequences.shape[0] == 4


def test_num_beams_one_is_greedy_on_image_rows(loaded):
    inputs = loaded.batch([(QUESTIONS[0], True), (QUESTIONS[1], True)])
    greedy = loaded.model.generate(**inputs, max_new_tokens=NEW, pad_token_id=loaded.pad)
    one_beam = loaded.model.generate(**inputs, max_new_tokens=NEW, pad_token_id=loaded.pad, num_beams=1)
    assert torch.equal(one_beam, greedy)


def test_beam_search_on_an_image_row_returns_the_best_sequences_by_brute_force(loaded):
    """Three allowed tokens, three steps: num_beams=9 finds the top 9 of the 27 sequences by model log-probability."""
    model = loaded.model
    inputs = loaded.batch([(QUESTIONS[0], True)])
    allowed = [loaded.tokenizer.convert_tokens_to_ids(t) for t in ("yes", "no", "red")]
    assert len(set(allowed)) == 3 and loaded.eos not in allowed
    out = model.generate(**inputs, num_beams=9, num_return_sequences=9, length_penalty=0.0, max_new_tokens=3,
                         prefix_allowed_tokens_fn=lambda batch_id, ids: allowed, eos_token_id=loaded.eos,
                         pad_token_id=loaded.pad, return_dict_in_generate=True, output_scores=True)

    candidates = torch.tensor(list(itertools.product(allowed, repeat=3)))
    prompt = inputs["input_ids"].expand(len(candidates), -1)
    with torch.no_grad():  # a full forward over each sequence, without the cache
        logits = model(input_ids=torch.cat([prompt, candidates], dim=1),
                       pixel_values=inputs["pixel_values"].expand(len(candidates), -1, -1, -1)).logits
    log_probs = logits[:, -4:-1].float().log_softmax(-1).gather(2, candidates[:, :, None])[..., 0].sum(1)
    order = log_probs.argsort(descending=True)
    assert log_probs[order[8]] - log_probs[order[9]] > 1e-3, "ninth and tenth too close to tell apart"
    assert out.sequences[:, prompt.shape[1]:].tolist() == candidates[order[:9]].tolist()
    torch.testing.assert_close(out.sequences_scores, log_probs[order[:9]], atol=1e-4, rtol=1e-4)


def test_sampling_gives_num_return_sequences_rows_per_prompt_reproducibly(loaded):
    inputs = loaded.batch([(QUESTIONS[0], True), (QUESTIONS[2], True)])
    settings = {"do_sample": True, "temperature": 1.5, "num_return_sequences": 3, "max_new_tokens": NEW,
                "pad_token_id": loaded.pad}
    torch.manual_seed(1)
    a = loaded.model.generate(**inputs, **settings)
    torch.manual_seed(1)
    b = loaded.model.generate(**inputs, **settings)
    torch.manual_seed(2)
    c = loaded.model.generate(**inputs, **settings)
    n = inputs["input_ids"].shape[1]
    assert a.shape[0] == 6 and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :n], inputs["input_ids"].repeat_interleave(3, 0))
    assert len({tuple(row) for row in a[:3, n:].tolist()}) > 1  # the samples of one prompt differ


MIXED = [(QUESTIONS[0], True), (QUESTIONS[1], False), (QUESTIONS[2], True), (QUESTIONS[3], False)]


def _alone(loaded: Loaded, index: int, **settings):
    question, image = MIXED[index]
    inputs = loaded.batch([(question, image)], seed=index)
    return loaded.model.generate(**inputs, **settings), inputs["input_ids"].shape[1]


def _mixed_inputs(loaded: Loaded) -> dict:
    """The MIXED rows in one batch, each image row with the image it has alone."""
    inputs = loaded.batch(MIXED)
    alone = [loaded.batch([row], seed=i).get("pixel_values") for i, row in enumerate(MIXED)]
    inputs["pixel_values"] = torch.cat([p for p in alone if p is not None])
    return inputs


def test_a_batch_mixing_image_and_text_rows_answers_each_row_as_alone(loaded):
    """Greedy ids and per-step scores of each row equal the row's own; text rows take the base-LM route."""
    model = loaded.model
    assert model.has_adapter and model.config.text_only_base_lm
    inputs = _mixed_inputs(loaded)
    settings = {"max_new_tokens": NEW, "pad_token_id": loaded.pad, "eos_token_id": loaded.eos,
                "repetition_penalty": 1.3, **OUTPUTS}
    batched = model.generate(**inputs, **settings)
    n = inputs["input_ids"].shape[1]
    assert torch.equal(batched.sequences[:, :n], inputs["input_ids"])
    for row in range(len(MIXED)):
        alone, m = _alone(loaded, row, **settings)
        steps = alone.sequences.shape[1] - m
        assert batched.sequences[row, n:n + steps].tolist() == alone.sequences[0, m:].tolist(), row
        assert batched.sequences[row, n + steps:].eq(loaded.pad).all(), row
        for step in range(steps):
            torch.testing.assert_close(batched.scores[step][row], alone.scores[step][0], atol=1e-5, rtol=1e-5)

    model.config.text_only_base_lm = False  # text rows through the adapter: their scores change
    try:
        adapted = model.generate(**inputs, **settings)
    finally:
        model.config.text_only_base_lm = True
    assert not torch.allclose(adapted.scores[0][1], batched.scores[0][1])
    torch.testing.assert_close(adapted.scores[0][0], batched.scores[0][0])


def test_beam_search_on_a_mixed_batch_answers_each_row_as_alone(loaded):
    inputs = _mixed_inputs(loaded)
    settings = {"num_beams": 3, "num_return_sequences": 2, "max_new_tokens": 5, "pad_token_id": loaded.pad,
                "eos_token_id": loaded.eos, "return_dict_in_generate": True, "output_scores": True}
    batched = loaded.model.generate(**inputs, **settings)
    n = inputs["input_ids"].shape[1]
    assert batched.sequences.shape[0] == 2 * len(MIXED)
    for row in range(len(MIXED)):
        alone, m = _alone(loaded, row, **settings)
        steps = alone.sequences.shape[1] - m
        assert batched.sequences[2 * row:2 * row + 2, n:n + steps].tolist() == alone.sequences[:, m:].tolist(), row
        torch.testing.assert_close(batched.sequences_scores[2 * row:2 * row + 2], alone.sequences_scores)
        assert batched.sequences[2 * row:2 * row + 2, n + steps:].eq(loaded.pad).all(), row
        expected = torch.where(alone.beam_indices >= 0, alone.beam_indices + 3 * row, -1)  # prompt `row`'s beams
        width = expected.shape[1]
        assert batched.beam_indices[2 * row:2 * row + 2, :width].tolist() == expected.tolist(), row
        assert batched.beam_indices[2 * row:2 * row + 2, width:].eq(-1).all(), row


def test_a_mixed_batch_with_a_prefix_function_asks_about_the_batch_rows(loaded):
    asked = set()

    def allowed(batch_id: int, ids: torch.Tensor) -> list[int]:
        asked.add(batch_id)
        return [42 + batch_id]

    inputs = _mixed_inputs(loaded)
    out = loaded.model.generate(**inputs, max_new_tokens=3, pad_token_id=loaded.pad, prefix_allowed_tokens_fn=allowed)
    assert asked == {0, 1, 2, 3}
    assert out[:, inputs["input_ids"].shape[1]:].tolist() == [[42 + row] * 3 for row in range(4)]


# Every GenerationConfig field generate() does not act on, enumerated from the installed transformers.
NOT_HONOURED = sorted(
    name for name in vars(GenerationConfig())
    if not name.startswith("_")
    and name not in PhiClipForCausalLM.GENERATION_HONOURED | PhiClipForCausalLM.GENERATION_NO_EFFECT
)


class Sentinel:
    def __repr__(self) -> str:
        return "SENTINEL"


@pytest.mark.parametrize("name", NOT_HONOURED)
def test_every_field_not_honoured_is_refused_by_name(loaded, name):
    inputs = loaded.batch([(QUESTIONS[0], True)])
    with pytest.raises(ValueError, match=rf"does not support {name}=SENTINEL"):
        loaded.model.generate(**inputs, max_new_tokens=2, **{name: Sentinel()})
    config = GenerationConfig(max_new_tokens=2)
    setattr(config, name, Sentinel())
    with pytest.raises(ValueError, match=rf"does not support {name}=SENTINEL"):
        loaded.model.generate(**inputs, generation_config=config)


@pytest.mark.parametrize("name", sorted(k for k, (off, _) in PhiClipForCausalLM.GENERATION_REFUSED.items()
                                        if off is not None and k in vars(GenerationConfig())))
def test_refused_fields_at_their_off_value_are_accepted(loaded, name):
    inputs = loaded.batch([(QUESTIONS[0], True)])
    off = PhiClipForCausalLM.GENERATION_REFUSED[name][0]
    expected = loaded.model.generate(**inputs, max_new_tokens=3)
    assert torch.equal(loaded.model.generate(**inputs, max_new_tokens=3, **{name: off}), expected)


def test_a_field_unknown_to_phiclip_is_refused_by_default(loaded):
    """A field a later transformers adds reaches generate() through the GenerationConfig: refused, named."""
    inputs = loaded.batch([(QUESTIONS[0], True)])
    with pytest.raises(ValueError, match="does not support brand_new_knob=3"):
        loaded.model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=2, brand_new_knob=3))
    with pytest.raises(TypeError, match="unexpected arguments: brand_new_knob"):
        loaded.model.generate(**inputs, max_new_tokens=2, brand_new_knob=3)


@pytest.mark.parametrize("name", sorted(PhiClipForCausalLM.GENERATE_ARGUMENTS_REFUSED))
def test_refused_generate_arguments_are_named(loaded, name):
    inputs = loaded.batch([(QUESTIONS[0], True)])
    with pytest.raises(ValueError, match=f"does not support {name}"):
        loaded.model.generate(**inputs, max_new_tokens=2, **{name: Sentinel()})


def test_inputs_embeds_gets_a_clear_error(loaded):
    inputs = loaded.batch([(QUESTIONS[0], False)])
    embeds = loaded.model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ValueError, match=r"inputs_embeds=\.\.\.\) is not supported.*language_model\.generate"):
        loaded.model.generate(inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match="needs input_ids"):
        loaded.model.generate(max_new_tokens=2)


@pytest.mark.parametrize("settings, message", [
    ({"num_return_sequences": 2}, "num_return_sequences"),
    ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences"),
    ({"output_scores": True}, "need return_dict_in_generate"),
    ({"num_beams": 2, "streamer": "STREAMER"}, "streamer cannot be used with beam search"),
    ({"max_new_tokens": None, "max_length": 5}, "max_length=5 leaves no room"),
    ({"stop_strings": ["x"]}, "stop_strings needs the tokenizer"),
])
def test_contradictory_settings_are_refused(loaded, settings, message):
    inputs = loaded.batch([(QUESTIONS[0], True)])
    if settings.get("streamer"):
        settings = dict(settings, streamer=TextStreamer(loaded.tokenizer))
    with pytest.raises(ValueError, match=message):
        loaded.model.generate(**inputs, **{"max_new_tokens": 2, **settings})


def test_a_streamer_needs_a_batch_of_one_route(loaded):
    with pytest.raises(ValueError, match="streamer needs a batch of one route"):
        loaded.model.generate(**_mixed_inputs(loaded), max_new_tokens=2, streamer=TextStreamer(loaded.tokenizer))


def test_user_processors_run_before_the_sampling_warpers(loaded):
    """A processor of the caller's that leaves one token wins even under sampling at a high temperature."""
    inputs = loaded.batch([(QUESTIONS[0], True)])

    class Only42(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            return torch.full_like(scores, float("-inf")).index_fill(1, torch.tensor([42]), 0.0)

    out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=True, temperature=2.0,
                                logits_processor=LogitsProcessorList([Only42()]))
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == [42, 42, 42]
