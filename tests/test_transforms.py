"""The original recipe's answer transforms: nltk's stopword corpus, found or clearly missing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from data.records import Turn
from data.transforms import STOPWORDS_INSTALL, drop_stopwords, english_stopwords, transform_answers


def test_stopwords_come_from_the_nltk_corpus(nltk_stopwords):
    assert english_stopwords() == nltk_stopwords


@pytest.mark.parametrize(
    "text, expected",
    [
        ("It is bright.", "bright."),
        ("It's a red ball, isn't it?", "red ball,"),
        ("It\u2019s (the) big one", "big one"),  # a typographic apostrophe, brackets around a stopword
        ("A well-known square - yes", "well-known square - yes"),  # punctuation alone is no stopword
        ("The\nsea", "sea"),
    ],
)
def test_drop_stopwords(nltk_stopwords, text, expected):
    assert drop_stopwords(text, english_stopwords()) == expected


def test_only_answers_are_transformed(nltk_stopwords):
    turns = [Turn("user", "What is it?"), Turn("assistant", "It is a circle.")]
    out = transform_answers(turns, stopwords=english_stopwords(), no_punctuation=True)
    assert [(t.role, t.content) for t in out] == [("user", "What is it?"), ("assistant", "circle")]


@pytest.fixture()
def no_stopwords_corpus(tmp_path, monkeypatch):
    """nltk searches only an empty folder, whatever this machine has installed."""
    import nltk

    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(nltk.data, "path", [])


def test_missing_corpus_stops_the_dataset_with_the_install_command(no_stopwords_corpus, smol_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessorPil

    from data.dataset import LlavaDataset
    from data.images import ImageResolver
    from data.records import Record, Report
    from processing_phiclip import PhiClipProcessor

    records = [Record("a", [Turn("user", "Hi"), Turn("assistant", "Hello there.")])]
    processor = PhiClipProcessor.from_parts(CLIPImageProcessorPil(), AutoTokenizer.from_pretrained(smol_tokenizer_dir))
    settings = dict(processor=processor,
                    resolver=ImageResolver(tmp_path), n_image_tokens=4, max_length=64, report=Report())
    assert len(LlavaDataset(records, **settings)) == 1  # the option off: no corpus needed
    with pytest.raises(FileNotFoundError, match=STOPWORDS_INSTALL) as err:
        LlavaDataset(records, **settings, drop_stopwords=True)
    assert "data.drop_stopwords" in str(err.value)
    assert STOPWORDS_INSTALL == "python -m nltk.downloader stopwords"


def test_importing_training_needs_neither_nltk_nor_its_corpus(tmp_path):
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "PYTHONPATH": os.pathsep.join(sys.path)}
    code = "import sys, data.transforms, data.dataset; print('nltk' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
