"""The original recipe's optional answer transforms (off by default).

They are applied to assistant turns before tokenization, so the trained labels are the
transformed text; a test checks that they reach the labels.
"""

from __future__ import annotations

import re
import string
from functools import lru_cache
from importlib.resources import files

from train.records import Turn

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    text = files("train").joinpath("stopwords_en.txt").read_text()
    return frozenset(w for w in text.split() if not w.startswith("#") and w.isalpha())


def drop_stopwords(text: str) -> str:
    words = stopwords()
    kept = [w for w in text.split() if _PUNCT.sub("", w).lower() not in words]
    return " ".join(kept)


def drop_punctuation(text: str) -> str:
    return " ".join(_PUNCT.sub("", text).split())


def transform_answers(turns: list[Turn], *, no_stopwords: bool, no_punctuation: bool) -> list[Turn]:
    """Apply the enabled transforms to assistant turns; other turns are left as they are."""
    if not (no_stopwords or no_punctuation):
        return turns
    out = []
    for turn in turns:
        content = turn.content
        if turn.role == "assistant":
            if no_stopwords:
                content = drop_stopwords(content)
            if no_punctuation:
                content = drop_punctuation(content)
        out.append(Turn(turn.role, content))
    return out
