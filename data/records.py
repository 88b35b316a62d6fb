"""Read LLaVA-Instruct conversations (JSON list or JSONL) into validated records.

Every record that cannot be used is reported with its file, record id and reason, and
skipped; nothing is keyed by id, so records that share an id (LLaVA-Instruct has many)
are all kept. :mod:`data.hf_records` maps Hugging Face datasets' rows onto the same records, and
:func:`data.sources.read_records` picks the reader for a source.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processing_phiclip import IMAGE_TOKEN

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Turn:
    role: str  # user | assistant | system
    content: str


@dataclass
class Record:
    """One conversation. ``images`` holds one entry per ``<image>`` marker in its user turns, in order: a file name
    (relative to the images folder), a :class:`data.images.RowImage` (an image embedded in a loaded dataset, read
    when needed) or anything :func:`processing_phiclip.open_image` reads (bytes, a ``datasets`` image dict, a PIL
    image)."""

    id: str
    turns: list[Turn]
    images: list[Any] = field(default_factory=list)
    source: str = ""
    index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source} record {self.index} (id {self.id})"


@dataclass
class Problem:
    file: str
    record: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: {self.reason}"


@dataclass
class Report:
    """What happened to every record read: how many were kept, and why the others were not."""

    n_read: int = 0
    n_kept: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: Counter = field(default_factory=Counter)  # kept records worth knowing about, by kind

    def skip(self, file: str, record: str, reason: str) -> None:
        self.problems.append(Problem(file, record, reason))

    def note(self, kind: str) -> None:
        """Count a kept record of this kind (e.g. text that spells a special token, kept and encoded as text)."""
        self.notes[kind] += 1

    def reasons(self) -> Counter:
        return Counter(p.reason.split(":")[0] for p in self.problems)

    def summary(self, show: int = 20) -> str:
        lines = [f"{self.n_read} records read, {self.n_kept} kept, {len(self.problems)} skipped"]
        for reason, count in self.reasons().most_common():
            lines.append(f"  {count:6d}  {reason}")
        for kind, count in self.notes.most_common():
            lines.append(f"  note: {count} kept record(s): {kind}")
        for problem in self.problems[:show]:
            lines.append(f"  - {problem}")
        if len(self.problems) > show:
            lines.append(f"  ... and {len(self.problems) - show} more")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_read": self.n_read,
            "n_kept": self.n_kept,
            "n_skipped": len(self.problems),
            "reasons": dict(self.reasons()),
            "notes": dict(self.notes),
            "problems": [vars(p) for p in self.problems],
        }


class BadRecord(ValueError):
    """Raised while parsing one record; the message is the reason reported for it."""


def iter_raw(path: Path, report: Report) -> Iterator[tuple[int, Any]]:
    """``(index, raw record)`` of a JSON list or JSONL file; a malformed JSONL line is read and reported here."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[")):
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield lineno - 1, json.loads(line)
            except json.JSONDecodeError as err:
                report.n_read += 1
                report.skip(str(path), f"line {lineno}", f"malformed JSON: {err.msg}")
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    yield from enumerate(data)


def raw_id(raw: Any, index: int) -> str:
    """The id a raw record is reported by: its ``id``, else ``#index``."""
    return str(raw.get("id", f"#{index}")) if isinstance(raw, dict) else f"#{index}"


def parse_record(raw: Any, source: str, index: int, images: list[Any] | None = None) -> Record:
    """Validate one raw LLaVA record and normalise roles; raise :class:`BadRecord` with the reason.

    ``images``: the record's images when the caller read them itself (a dataset's image columns), in place
    of ``raw``'s ``image`` / ``images`` fields.
    """
    if not isinstance(raw, dict):
        raise BadRecord(f"not an object: {type(raw).__name__}")
    rid = raw_id(raw, index)
    convs = raw.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise BadRecord("empty conversation: 'conversations' missing or empty")
    images = _images_field(raw) if images is None else list(images)
    turns: list[Turn] = []
    for t, turn in enumerate(convs):
        if not isinstance(turn, dict):
            raise BadRecord(f"malformed turn: turn {t} is not an object")
        who, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
        if who not in ROLES:
            raise BadRecord(f"unknown role: turn {t} has role {who!r}")
        if not isinstance(value, str):
            raise BadRecord(f"non-string value: turn {t} value is {type(value).__name__}")
        turns.append(Turn(ROLES[who], value))
    if turns[0].role == "system":
        system, body = turns[:1], turns[1:]
    else:
        system, body = [], turns
    for t, turn in enumerate(body):
        expected = "user" if t % 2 == 0 else "assistant"
        if turn.role != expected:
            raise BadRecord(f"malformed conversation: turn {t + len(system)} is {turn.role}, expected {expected}")
    if len(body) < 2:
        raise BadRecord("no answer: conversation has no assistant turn")
    if len(body) % 2:
        body = body[:-1]  # a trailing question without answer teaches nothing
    for t, turn in enumerate(body):
        if turn.role == "assistant" and not turn.content.strip():
            raise BadRecord(f"no answer: assistant turn {t + len(system)} is empty")
    n_markers = sum(turn.content.count(IMAGE_TOKEN) for turn in body if turn.role == "user")
    if not images and n_markers:
        raise BadRecord(f"placeholder without image: {n_markers} '{IMAGE_TOKEN}' marker(s) in the text but no image")
    if len(images) == 1 and n_markers == 0:
        body[0] = Turn("user", f"{IMAGE_TOKEN}\n{body[0].content}")  # LLaVA's convention: the image comes first
    elif n_markers != len(images):
        raise BadRecord(f"bad placeholder: {n_markers} '{IMAGE_TOKEN}' marker(s) in the user turns for "
                        f"{len(images)} image(s)")
    extra = {k: v for k, v in raw.items() if k not in ("id", "image", "images", "conversations")}
    return Record(id=rid, turns=system + body, images=images, source=source, index=index, extra=extra)


def _images_field(raw: dict) -> list[Any]:
    """``image`` (a name or a list of names) or ``images`` (a list): LLaVA's and LLaVA-OneVision's spellings."""
    if "image" in raw and "images" in raw and raw["image"] is not None and raw["images"] is not None:
        raise BadRecord("bad field: both 'image' and 'images' are given")
    key = "images" if raw.get("images") is not None else "image"
    value = raw.get(key)
    if value is None:
        return []
    names = value if isinstance(value, list) else [value]
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            where = f"'{key}'" if not isinstance(value, list) else f"'{key}'[{i}]"
            raise BadRecord(f"bad field: {where} must be a non-empty string, got {name!r:.60}")
    return list(names)
