"""Label masks come from the template's structure, for ChatML, Phi-3 and Llama-3 templates."""

import json

import pytest
from helpers import TEMPLATES, tokenizer_with_template

from train.records import Turn
from train.template import (
    IGNORE_INDEX,
    TemplateError,
    encode_conversation,
    encode_prompt,
    render,
    to_messages,
)

END_OF_TURN = {"chatml": "<|im_end|>", "phi3": "<|end|>", "llama3": "<|eot_id|>"}
TURNS = [
    Turn("user", "<image>\nWhat is in the picture?"),
    Turn("assistant", "A red circle on the left."),
    Turn("user", "And its size?"),
    Turn("assistant", "It is small."),
]


def supervised_runs(tok, enc) -> list[str]:
    """Decode each contiguous run of supervised tokens."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == token, "labels must be the unshifted input ids (the HF loss shifts them)"
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.fixture(params=["chatml", "phi3", "llama3"])
def tok(request, smol_tokenizer_dir):
    t = tokenizer_with_template(smol_tokenizer_dir, request.param)
    t.add_special_tokens({"additional_special_tokens": ["<image>"]})
    t.kind = request.param
    return t


def test_only_answers_and_end_of_turn_are_supervised(tok):
    enc = encode_conversation(tok, TURNS, n_image_tokens=5, max_length=512)
    end = END_OF_TURN[tok.kind]
    assert supervised_runs(tok, enc) == [f"A red circle on the left.{end}", f"It is small.{end}"]
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 1  # the model splices 5 features in


def test_prompt_matches_training_prefix(tok):
    """The inference prompt is exactly the tokens that precede the first answer in training."""
    enc = encode_conversation(tok, TURNS[:2], n_image_tokens=3, max_length=512)
    first_label = next(i for i, label in enumerate(enc.labels) if label != IGNORE_INDEX)
    prompt = encode_prompt(tok, [{"role": "user", "content": TURNS[0].content}])
    assert prompt == enc.input_ids[:first_label]


def test_bos_appears_once(tok):
    """BOS comes from the template alone: the tokenizer never adds a second one, in any family."""
    enc = encode_conversation(tok, TURNS, n_image_tokens=2, max_length=512)
    bos = tok.bos_token_id
    in_template = render(tok, to_messages(TURNS), generation_prompt=False).count(tok.bos_token)
    assert enc.input_ids.count(bos) == in_template
    assert enc.input_ids[:2] != [bos, bos]
    # Llama-3 opens with <|begin_of_text|> once; SmolLM2's BOS is ChatML's <|im_start|>, which opens
    # every turn (a default system turn and the four of TURNS); the Phi-3 template writes no BOS.
    expected = {"llama3": 1, "chatml": 5, "phi3": 0}[tok.kind]
    assert in_template == expected
    if expected:
        assert enc.input_ids[0] == bos


def test_truncation_drops_whole_turns_never_image_tokens(tok):
    full = encode_conversation(tok, TURNS, n_image_tokens=8, max_length=512)
    last_supervised = max(i for i, label in enumerate(full.labels) if label != IGNORE_INDEX)
    # The image takes 8 positions but is one token: the last answer ends at position last_supervised + 7.
    kept = encode_conversation(tok, TURNS, n_image_tokens=8, max_length=last_supervised + 8)
    assert kept.n_turns_kept == 2
    short = encode_conversation(tok, TURNS, n_image_tokens=8, max_length=last_supervised + 7)
    assert short.n_turns_kept == 1
    assert short.input_ids == full.input_ids[: len(short.input_ids)]
    assert short.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert supervised_runs(tok, short) == [f"A red circle on the left.{END_OF_TURN[tok.kind]}"]


def test_record_that_cannot_fit_is_refused(tok):
    with pytest.raises(TemplateError, match="too long"):
        encode_conversation(tok, TURNS, n_image_tokens=64, max_length=40)


def test_system_prompt_is_not_supervised(tok):
    enc = encode_conversation(
        tok, TURNS[:2], n_image_tokens=1, max_length=512, system_prompt="Be brief."
    )
    assert all("Be brief" not in run for run in supervised_runs(tok, enc))
    assert "Be brief." in tok.decode(enc.input_ids)


def test_template_fixtures_name_their_end_token():
    for kind in ("phi3", "llama3"):
        spec = json.loads((TEMPLATES / f"{kind}.json").read_text())
        assert spec["end_of_turn"] == END_OF_TURN[kind]
