"""The original recipe's optional answer transforms (off by default).

They are applied to assistant turns before tokenization, so the trained labels are the
transformed text; a test checks that they reach the labels. Dropping stopwords uses nltk's
English stopword corpus, data that nltk installs apart from the package
(``python -m nltk.downloader stopwords``); nltk itself is imported only when it is used.
"""

from __future__ import annotations

import os
import re
import string

from data.records import Turn

STOPWORDS_INSTALL = "python -m nltk.downloader stopwords"
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = r"\w+(?:'\w+)*"  # "it's" stays one word, as nltk's stopword list spells it


def english_stopwords() -> frozenset[str]:
    """nltk's English stopword corpus; a clear error naming the install command when it is missing.

    nltk reads ``$NLTK_DATA`` once, when first imported; it is read again here, so the
    folder named at the time of the call is searched first.
    """
    import nltk

    named = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    try:
        found = nltk.data.find("corpora/stopwords/english", paths=named + nltk.data.path)
    except LookupError:
        raise FileNotFoundError(
            "data.drop_stopwords needs nltk's English stopword corpus, which is not installed. "
            f"Install it with: {STOPWORDS_INSTALL} (or point NLTK_DATA at a folder holding corpora/stopwords)"
        ) from None
    with found.open(encoding="utf-8") as f:
        return frozenset(word.lower() for word in f.read().split())


def drop_stopwords(text: str, stopwords: frozenset[str]) -> str:
    """Drop each whitespace-separated chunk whose words (nltk's regexp tokenizer) are all stopwords.

    A chunk goes with the punctuation stuck to it ("is." or "(the"), so none is left dangling.
    """
    from nltk.tokenize import regexp_tokenize

    kept = []
    for chunk in text.split():
        words = [w.lower() for w in regexp_tokenize(chunk.replace("\u2019", "'"), _WORD)]
        if not words or not all(w in stopwords for w in words):
            kept.append(chunk)
    return " ".join(kept)


def drop_punctuation(text: str) -> str:
    return " ".join(_PUNCT.sub("", text).split())


def transform_answers(turns: list[Turn], *, stopwords: frozenset[str] | None, no_punctuation: bool) -> list[Turn]:
    """Apply the enabled transforms to assistant turns (``stopwords``: drop those); other turns stay as they are."""
    if stopwords is None and not no_punctuation:
        return turns
    out = []
    for turn in turns:
        content = turn.content
        if turn.role == "assistant":
            if stopwords is not None:
                content = drop_stopwords(content, stopwords)
            if no_punctuation:
                content = drop_punctuation(content)
        out.append(Turn(turn.role, content))
    return out
