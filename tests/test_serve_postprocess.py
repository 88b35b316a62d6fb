"""Answer clean-up: echo, repeats, spaces, punctuation; streamed and whole give the same text."""

from __future__ import annotations

import random

import pytest

from serve.postprocess import Cleaner, Options, clean

CASES = [
    # question, raw answer, cleaned, cleaned without punctuation
    (
        "What colour is the shape?",
        "What colour is the shape? The shape is red.",
        "The shape is red.",
        "The shape is red",
    ),
    ("What colour is the shape?", "what colour is the shape: red", "red", "red"),
    ("", "a red circle, a red circle, a red circle.", "a red circle.", "a red circle"),
    ("", "It is red. It is red. It is red.", "It is red.", "It is red"),
    ("", "  The   shape  is\n\n blue .  ", "The shape is\nblue.", "The shape is\nblue"),
    ("", "the the cat sat on on the mat", "the cat sat on the mat", "the cat sat on the mat"),
    ("Is it big?", "Is it", "Is it", "Is it"),
    ("Is it big?", "Is it small? No.", "Is it small? No.", "Is it small No"),
    ("", "It's a well-known (blue) square!", "It's a well-known (blue) square!", "It's a well-known blue square"),
    ("", "", "", ""),
]


@pytest.mark.parametrize("question,raw,cleaned,bare", CASES)
def test_clean(question, raw, cleaned, bare):
    assert clean(raw, question) == cleaned
    assert clean(raw, question, Options(clean=True, drop_punctuation=True)) == bare


def test_punctuation_only():
    assert clean("Hi,  there!  It is red.", options=Options(drop_punctuation=True)) == "Hi there It is red"


@pytest.mark.parametrize("question,raw", [(q, r) for q, r, _, _ in CASES])
def test_streaming_in_random_pieces_gives_the_same_text(question, raw):
    for options in (Options(clean=True), Options(clean=True, drop_punctuation=True)):
        whole = clean(raw, question, options)
        for seed in range(30):
            rng = random.Random(seed)
            cleaner, out, i = Cleaner(question, options), "", 0
            while i < len(raw):
                j = i + rng.randint(1, 6)
                out += cleaner.feed(raw[i:j])
                i = j
            assert out + cleaner.finish() == whole


def test_long_answer_streams_before_it_ends():
    cleaner = Cleaner("", Options(clean=True), max_phrase=4)
    text = " ".join(f"word{i}" for i in range(30)) + " "
    assert cleaner.feed(text).startswith("word0 word1")  # only the last 2 * max_phrase words are held back
