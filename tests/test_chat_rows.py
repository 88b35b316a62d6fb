"""Per-row generation (chat.rows): stop strings, seeds, logprobs, penalties, logit bias and JSON, each row
answering in a batch as it would alone."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny_run, tiny_backbones

from chat.assistant import GenerationSettings, VisionChat
from chat.rows import PresenceFrequencyPenalty, Row

SEA = [{"role": "user", "content": "Tell me about the sea."}]
HI = [{"role": "user", "content": "Hi"}]
CITY = [{"role": "user", "content": "Name a city."}]


@pytest.fixture(scope="module")
def chat(tmp_path_factory, smol_tokenizer_dir) -> VisionChat:
    out = tmp_path_factory.mktemp("rows-run")
    lm, clip = tiny_backbones(out, smol_tokenizer_dir)
    return VisionChat.load(build_tiny_run(out, lm, clip))


def one(chat: VisionChat, messages, settings: GenerationSettings):
    return chat.complete([messages], [None], settings)[0]


def streamed(chat: VisionChat, messages, settings: GenerationSettings) -> tuple[list[str], object]:
    stream = chat.stream(messages, None, settings)
    return list(stream), stream.completion


# stop strings ----------------------------------------------------------------------------------
def test_a_stop_string_spanning_tokens_ends_the_answer_before_it(chat):
    free = one(chat, SEA, GenerationSettings(max_new_tokens=24))
    words = free.text.split(" ")
    assert len(words) > 6 and len(free.token_ids) == 24
    stop = f"{words[3][-2:]} {words[4]}"  # the end of one token, a space, the next word: several tokens
    assert len(chat.tokenizer.encode(stop, add_special_tokens=False)) > 1
    cut = one(chat, SEA, GenerationSettings(max_new_tokens=24, stop=("no such text", stop)))
    assert cut.text == free.text[: free.text.index(stop)].strip()
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    # the tokens up to the one that completed the stop string were generated, no more
    assert cut.token_ids == free.token_ids[: len(cut.token_ids)] and len(cut.token_ids) < 24
    pieces, completion = streamed(chat, SEA, GenerationSettings(max_new_tokens=24, stop=(stop,)))
    assert "".join(pieces).strip() == cut.text and completion.finish_reason == "stop"  # none of the stop was sent


WORDS = {1: "The", 2: " sea", 3: " is", 4: " big", 5: ".", 6: "\ufffd", 7: "\u00e9"}


def scripted_row(stop: tuple[str, ...], sent: list[str], max_new_tokens: int = 10) -> Row:
    def decode(ids: list[int]) -> str:  # token 6 is half of "é": alone it decodes to U+FFFD, with 7 to "é"
        text = "".join(WORDS[i] for i in ids if i != 7)
        return text[:-1] + "\u00e9" if ids[-1:] == [7] else text

    settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=stop)
    return Row(settings, decode, WORDS.get, eos={0}, prompt_length=0, sink=lambda piece, _: sent.append(piece))


@pytest.mark.parametrize(
    "stop,tokens,pieces,text,reason",
    [
        ((" is big",), [1, 2, 3, 4, 5], ["The", " sea"], "The sea", "stop"),  # " is" held, then dropped
        ((" is small",), [1, 2, 3, 4, 5], ["The", " sea", " is big", "."], "The sea is big.", "length"),
        (("sea is",), [1, 2, 3, 4], ["The", " "], "The", "stop"),  # "sea" waits, then goes with the stop
        (("big",), [1, 3, 6, 7, 0], ["The", " is", "\u00e9"], "The is\u00e9", "stop"),  # a half character waits
    ],
)
def test_text_that_could_become_a_stop_string_is_held_back_then_sent(stop, tokens, pieces, text, reason):
    sent: list[str] = []
    row = scripted_row(stop, sent, max_new_tokens=len(tokens))
    for token in tokens:
        row.feed(token)
    assert sent == pieces
    assert row.completion().text == text and row.finish_reason == reason


def test_eos_ends_a_row_with_stop(chat):
    eos = chat.model.generation_config.eos_token_id
    eos = eos if isinstance(eos, int) else eos[0]
    forced = one(chat, HI, GenerationSettings(max_new_tokens=8, logit_bias={eos: 100.0}))
    assert forced.token_ids == [eos] and forced.text == "" and forced.finish_reason == "stop"


# seeds -----------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_text_in_any_batch_without_touching_the_global_rng(chat):
    sampled = GenerationSettings(max_new_tokens=12, temperature=1.0, seed=7)
    torch.manual_seed(123)
    alone = one(chat, SEA, sampled)
    after_alone = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_alone)  # seeded rows draw from their own generator
    batch = chat.complete([HI, SEA, CITY], [None] * 3, [GenerationSettings(max_new_tokens=5), sampled,
                                                        GenerationSettings(max_new_tokens=12, temperature=1.0, seed=8)])
    assert batch[1].text == alone.text
    assert batch[2].text != alone.text  # another seed, another text
    greedy = one(chat, SEA, GenerationSettings(max_new_tokens=12))
    assert alone.text != greedy.text


# logprobs --------------------------------------------------------------------------------------
def test_logprobs_are_the_models_log_softmax(chat):
    settings = GenerationSettings(max_new_tokens=6, logprobs=True, top_logprobs=3)
    completion = one(chat, SEA, settings)
    assert len(completion.logprobs) == len(completion.token_ids) == 6
    prompt = chat.model_inputs([SEA], [None])["input_ids"]
    ids = torch.cat([prompt, torch.tensor([completion.token_ids])], dim=1)
    with torch.no_grad(), chat.model.adapter_disabled():  # text questions run on the base LM
        logits = chat.model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
    expected = logits.log_softmax(-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        assert entry.token == chat.tokenizer.decode([token])
        assert entry.logprob == pytest.approx(float(expected[step, token]), abs=1e-4)
        best = expected[step].topk(3)
        assert [t for t, _ in entry.top] == [chat.tokenizer.decode([int(i)]) for i in best.indices]
        assert [v for _, v in entry.top] == pytest.approx(best.values.tolist(), abs=1e-4)
        assert entry.top[0][1] >= entry.logprob - 1e-6  # greedy: the chosen token is the most likely
    assert "".join(e.token for e in completion.logprobs).strip() == completion.text
    assert one(chat, SEA, GenerationSettings(max_new_tokens=6)).logprobs is None


def test_streamed_logprobs_cover_the_streamed_tokens(chat):
    got: list = []
    settings = GenerationSettings(max_new_tokens=10, logprobs=True)
    completion = chat.complete([SEA], [None], settings, sinks=[lambda piece, lps: got.append((piece, lps))])[0]
    assert [e for _, lps in got for e in lps] == completion.logprobs
    assert "".join(p for p, _ in got).strip() == completion.text


# penalties, bias, JSON -------------------------------------------------------------------------
def test_presence_and_frequency_penalties_follow_openais_formula():
    scores = torch.zeros(1, 6)
    ids = torch.tensor([[5, 5, 1, 2, 2, 2, 3]])  # prompt: 5 5; answer: 1 2 2 2 3
    out = PresenceFrequencyPenalty(presence=0.5, frequency=0.25, prompt_length=2)(ids, scores)
    # count: token1 = 1, token2 = 3, token3 = 1, token5 only in the prompt
    assert out.tolist() == [[0.0, -0.75, -1.25, -0.75, 0.0, 0.0]]


def test_a_frequency_penalty_changes_a_repetitive_answer(chat):
    free = one(chat, SEA, GenerationSettings(max_new_tokens=24))
    penalised = one(chat, SEA, GenerationSettings(max_new_tokens=24, frequency_penalty=2.0, presence_penalty=2.0))
    repeats = len(free.token_ids) - len(set(free.token_ids))
    assert len(penalised.token_ids) - len(set(penalised.token_ids)) <= repeats


def test_logit_bias_is_added_to_the_logits(chat):
    token = chat.tokenizer.encode(" sea", add_special_tokens=False)[0]
    out = one(chat, HI, GenerationSettings(max_new_tokens=4, logit_bias={token: 100.0}))
    assert out.token_ids == [token] * 4
    with pytest.raises(ValueError, match="outside the model.s vocabulary"):
        one(chat, HI, GenerationSettings(max_new_tokens=4, logit_bias={10**7: 1.0}))


def test_json_schema_constrains_the_answer(chat):
    schema = {
        "type": "object",
        "properties": {"bright": {"type": "boolean"}, "count": {"type": "integer", "maximum": 9, "minimum": 0}},
        "required": ["bright", "count"],
        "additionalProperties": False,
    }
    for settings in (GenerationSettings(max_new_tokens=40, json_schema=schema),
                     GenerationSettings(max_new_tokens=40, json_schema=schema, temperature=1.0, seed=3)):
        completion = one(chat, HI, settings)
        value = json.loads(completion.text)
        assert set(value) == {"bright", "count"} and isinstance(value["bright"], bool) and 0 <= value["count"] <= 9
        assert completion.finish_reason == "stop"
    free = one(chat, HI, GenerationSettings(max_new_tokens=40))
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)


# batched = alone -------------------------------------------------------------------------------
def test_rows_with_different_settings_answer_as_alone(chat):
    settings = [
        GenerationSettings(max_new_tokens=10),
        GenerationSettings(max_new_tokens=3),
        GenerationSettings(max_new_tokens=12, repetition_penalty=1.3),
        GenerationSettings(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=11),
        GenerationSettings(max_new_tokens=12, logprobs=True, presence_penalty=0.5),
    ]
    conversations = [SEA, HI, CITY, SEA, HI + [{"role": "assistant", "content": "Hello!"}] + CITY]
    together = chat.complete(conversations, [None] * 5, settings)
    for messages, s, got in zip(conversations, settings, together):
        alone = one(chat, messages, s)
        assert (got.text, got.token_ids, got.finish_reason) == (alone.text, alone.token_ids, alone.finish_reason)
        if s.logprobs:
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)
    assert [len(c.token_ids) for c in together[:2]] == [10, 3]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8))


def test_image_rows_of_different_lengths_keep_their_own_penalties(chat, monkeypatch):
    """The processors see spliced rows (image features as padding): each row's penalties count its own answer."""
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it bright?"}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Compare these two, please, in detail."},
                                      {"type": "image"}, {"type": "image"}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
    ]
    images = [[picture(1)], [picture(2), picture(3)], [picture(4)]]
    settings = [
        GenerationSettings(max_new_tokens=12, presence_penalty=1.5, frequency_penalty=1.0),
        GenerationSettings(max_new_tokens=12, repetition_penalty=1.5, logprobs=True),
        GenerationSettings(max_new_tokens=12, temperature=0.9, seed=4, frequency_penalty=2.0),
    ]
    seen: dict[int, list[list[int]]] = {}  # id(settings) -> the ids its processors were shown, step by step
    original = Row.process

    def recording(row, ids, scores):
        seen.setdefault(id(row.settings), []).append(ids.tolist())
        return original(row, ids, scores)

    monkeypatch.setattr(Row, "process", recording)
    together = chat.complete(conversations, images, settings)
    in_batch = dict(seen)
    for messages, pics, s, got in zip(conversations, images, settings, together):
        seen.clear()
        alone = chat.complete([messages], [pics], s)[0]
        assert (got.text, got.token_ids) == (alone.text, alone.token_ids)
        assert in_batch[id(s)] == seen[id(s)]  # the row's own ids, without the batch's padding


def test_a_cancelled_row_stops_and_the_others_go_on(chat):
    gone = threading.Event()
    seen: list[str] = []

    def sink(piece, _):
        seen.append(piece)
        if len(seen) == 3:
            gone.set()

    settings = GenerationSettings(max_new_tokens=20)
    out = chat.complete([SEA, CITY], [None, None], settings, sinks=[sink, None], cancelled=[gone, None])
    assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) < 20
    assert out[1].token_ids == one(chat, CITY, settings).token_ids


def test_one_call_may_mix_image_and_text_only_prompts(chat):
    """complete() answers image rows and text-only rows by their own routes, in order, as each would alone."""
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    question = [{"role": "user", "content": "What is it?"}]
    settings = GenerationSettings(max_new_tokens=6)
    mixed = chat.complete([question, question, question], [image, None, image], settings)
    alone = [chat.complete([question], [image], settings)[0], chat.complete([question], [None], settings)[0]]
    assert [c.token_ids for c in mixed] == [alone[0].token_ids, alone[1].token_ids, alone[0].token_ids]
    pieces: list[list[str]] = [[], [], []]
    streamed = chat.complete([question, question, question], [None, image, None], settings,
                             sinks=[lambda piece, _, k=k: pieces[k].append(piece) for k in range(3)])
    assert ["".join(p).strip() for p in pieces] == [c.text for c in streamed]
    assert streamed[1].token_ids == alone[0].token_ids
