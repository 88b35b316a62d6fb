"""Optional clean-up of an answer: echoed question, repeated phrases, extra spaces, punctuation.

Small models often start by repeating the question, get stuck repeating a phrase, or
leave stray spaces. :class:`Cleaner` fixes these word by word as text streams in, so a
streamed cleaned answer and a cleaned whole answer are the same text: it only holds back
the few words that a later word could still change (a possible echo at the start, the
last ``2 * max_phrase`` words for repeats) and never takes back what it has let out.

- echo: the answer's first words equal the question's words (case and punctuation
  ignored) -> they are dropped, with a separator such as ``:`` after them;
- repeats: a phrase of 1 to ``max_phrase`` words immediately followed by the same phrase
  -> the copy is dropped (its closing punctuation moves to the kept phrase);
- spaces: runs of whitespace become one space (a newline if they held one), no space
  before closing punctuation;
- punctuation (optional): removed, except apostrophes and hyphens inside words.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

_CLOSING = set(".,;:!?)]}%…")
_SEPARATORS = {":", "-", "–", "—", ",", "."}
_PUNCT = set(string.punctuation) | set("…“”‘’«»–—")
_INNER = set("'’-")  # kept between letters/digits when punctuation is removed
_TOKEN = re.compile(r"(\s*)(\S+)(?=\s)")
_LAST = re.compile(r"(\s*)(\S+)\s*$")


@dataclass
class Options:
    """The post-processing switches; all off by default."""

    clean: bool = False
    drop_punctuation: bool = False

    @property
    def active(self) -> bool:
        return self.clean or self.drop_punctuation


@dataclass
class _Word:
    text: str
    newline: bool  # the whitespace before it held a newline

    @property
    def key(self) -> str:
        return normalize(self.text)


def normalize(word: str) -> str:
    return "".join(ch for ch in word.lower() if ch.isalnum())


def strip_punctuation(word: str) -> str:
    out = []
    for i, ch in enumerate(word):
        if ch not in _PUNCT:
            out.append(ch)
        elif ch in _INNER and 0 < i < len(word) - 1 and word[i - 1].isalnum() and word[i + 1].isalnum():
            out.append(ch)
    return "".join(out)


def _trailing_punct(word: str) -> str:
    return word[len(word.rstrip("".join(_PUNCT))) :]


class Cleaner:
    """Feed text pieces with :meth:`feed`, then call :meth:`finish`; both return text to emit."""

    def __init__(self, question: str = "", options: Options | None = None, max_phrase: int = 8) -> None:
        self.options = options or Options(clean=True)
        self.max_phrase = max_phrase
        self._pending = ""
        self._question = [w for w in (normalize(t) for t in question.split()) if w] if self.options.clean else []
        self._echo: list[_Word] | None = [] if self._question else None  # None: echo settled
        self._echo_dropped = False
        self._held: list[_Word] = []
        self._started = False

    # text in -------------------------------------------------------------------------------
    def feed(self, piece: str) -> str:
        self._pending += piece
        out = []
        end = 0
        for match in _TOKEN.finditer(self._pending):
            out.append(self._word(_Word(match.group(2), "\n" in match.group(1))))
            end = match.end()
        self._pending = self._pending[end:]
        return "".join(out)

    def finish(self) -> str:
        out = []
        last = _LAST.match(self._pending)
        if last:
            out.append(self._word(_Word(last.group(2), "\n" in last.group(1))))
        self._pending = ""
        if self._echo:  # the answer ended while still matching the question: keep it
            words, self._echo = self._echo, None
            out.extend(self._repeat(w) for w in words)
        self._echo = None
        if self._held:  # a phrase cut short by a dropped repeat may end in a comma
            tail = self._held[-1]
            tail.text = tail.text.rstrip(",;") or tail.text
        out.extend(self._emit(w) for w in self._held)
        self._held = []
        return "".join(out)

    # stages --------------------------------------------------------------------------------
    def _word(self, word: _Word) -> str:
        if self._echo is None:
            if self._echo_dropped and not self._started and not self._held and word.text in _SEPARATORS:
                return ""  # "Question?: answer" -> "answer"
            return self._repeat(word)
        self._echo.append(word)
        keys = [w.key for w in self._echo if w.key]
        if keys == self._question[: len(keys)]:
            if len(keys) == len(self._question):
                self._echo, self._echo_dropped = None, True
            return ""
        words, self._echo = self._echo, None
        return "".join(self._repeat(w) for w in words)

    def _repeat(self, word: _Word) -> str:
        if not self.options.clean:
            return self._emit(word)
        self._held.append(word)
        self._drop_repeat()
        out = []
        while len(self._held) > 2 * self.max_phrase:
            out.append(self._emit(self._held.pop(0)))
        return "".join(out)

    def _drop_repeat(self) -> None:
        held = self._held
        for n in range(1, min(self.max_phrase, len(held) // 2) + 1):
            copy, kept = held[-n:], held[-2 * n : -n]
            if all(a.key and a.key == b.key for a, b in zip(copy, kept)):
                closing = _trailing_punct(copy[-1].text)
                del held[-n:]
                last = held[-1]
                if closing:
                    last.text = last.text[: len(last.text) - len(_trailing_punct(last.text))] + closing
                return

    def _emit(self, word: _Word) -> str:
        text = strip_punctuation(word.text) if self.options.drop_punctuation else word.text
        if not text:
            return ""
        if not self._started:
            self._started = True
            return text
        if not self.options.drop_punctuation and all(ch in _CLOSING for ch in text):
            return text
        return ("\n" if word.newline else " ") + text


def clean(text: str, question: str = "", options: Options | None = None) -> str:
    cleaner = Cleaner(question, options)
    return cleaner.feed(text) + cleaner.finish()


class Trim:
    """Strip leading and trailing whitespace from a stream, as ``str.strip()`` does for the whole."""

    def __init__(self) -> None:
        self._started = False
        self._space = ""

    def feed(self, piece: str) -> str:
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        body = piece.rstrip()
        if not body:
            self._space += piece
            return ""
        out = self._space + body
        self._space = piece[len(body) :]
        return out
