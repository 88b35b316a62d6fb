"""Records from Hugging Face datasets, loaded with the ``datasets`` library.

A source is named by one string (``data.train``, ``data.eval``, ``phiclip data check|stats``, ``phiclip eval``):

* ``hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]``: a Hub dataset; the split is ``train`` unless named, the
  revision (branch, tag or commit sha) ``main`` unless pinned. ``@`` means a revision, as in the Hub's own
  ``hf://`` paths; e.g. ``hf://HuggingFaceM4/the_cauldron:vqav2/train@4d3bd06``.
* ``PATH.parquet`` / ``PATH.arrow`` (or a glob of them): data files written by ``datasets`` or any parquet writer;
* ``FOLDER``: a ``save_to_disk`` folder (a dataset, or a dataset dict: its ``train`` split), else a folder of
  parquet/arrow files (its ``train`` split, as ``datasets.load_dataset`` reads it).

Two row layouts, told apart by the columns:

* TRL's conversational layout: ``messages`` (``role`` and ``content``: a string, or parts ``{"type": "image"}`` /
  ``{"type": "text", "text": ...}``) and ``images`` (a list);
* LLaVA's layout in columns: ``conversations`` (``from`` / ``value``, ``<image>`` markers) and ``image`` (one or
  a list) or ``images`` (a list).

Images are ``datasets.Image`` values (bytes, or a path), file names, or bytes. Every row becomes the raw LLaVA
record the JSON reader parses (:func:`data.records.parse_record`): a TRL message's parts become one string, an
``<image>`` marker in place of each image part (followed by a new line; text parts joined by a space, as
:mod:`processing_phiclip` lays out parts), so templates, labels, several images, lengths and the bad-record
report are those of the JSON path. A row without an ``id`` column is reported as ``#ROW``.

Embedded images stay in the dataset's memory-mapped Arrow files: a record holds a
:class:`data.images.RowImage` (dataset, row, column, item) that is read when its item is built. Images stored
as paths are file names, looked up (safely) in the images folder, by default the local dataset's own folder.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.images import RowImage, StoredImages
from data.records import BadRecord, Record, parse_record, raw_id
from processing_phiclip import IMAGE_TOKEN

_HUB = re.compile(r"hf://(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[^/@]+))?(?:/(?P<split>[^/@]+))?"
                  r"(?:@(?P<revision>.+))?")
SPELLING = "hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]"
BATCH_ROWS = 1000  # rows read at a time when scanning a dataset


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from: a Hub id (with config, split, revision) or a local path."""

    text: str
    repo: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    path: Path | None = None


def parse_source(text: str) -> DatasetSource:
    """Read a source string (module docstring); raises ``ValueError`` for a malformed ``hf://`` one."""
    if text.startswith("hf://"):
        match = _HUB.fullmatch(text)
        if match is None:
            raise ValueError(f"data source {text!r}: a Hub dataset is spelled {SPELLING}")
        return DatasetSource(text, match["repo"], match["config"], match["split"] or "train", match["revision"])
    return DatasetSource(text, path=Path(text))


def local_folder(text: str) -> Path | None:
    """The folder a local dataset's image file names are relative to; ``None`` for a Hub dataset."""
    source = parse_source(text)
    if source.path is None:
        return None
    return source.path if source.path.is_dir() else source.path.parent


def load_rows(text: str, streaming: bool = False) -> Any:
    """The source's rows: a ``datasets.Dataset`` (memory-mapped Arrow cache), or a ``datasets.IterableDataset``
    with ``streaming`` (nothing downloaded up front). Raises ``FileNotFoundError`` / ``ValueError`` naming it."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"data source {text}: reading datasets needs the datasets library "
                         "(pip install 'phiclip[datasets]')") from err

    source = parse_source(text)
    try:
        if source.repo is not None:
            rows = datasets.load_dataset(source.repo, source.config, split=source.split, revision=source.revision,
                                         streaming=streaming)
        elif source.path.is_dir() and (source.path / "dataset_dict.json").is_file():
            splits = datasets.load_from_disk(str(source.path))
            if "train" not in splits:
                raise ValueError(f"no 'train' split (splits: {', '.join(splits)}); name a split's folder, "
                                 f"e.g. {source.path / next(iter(splits))}")
            rows = splits["train"].to_iterable_dataset() if streaming else splits["train"]
        elif source.path.is_dir() and (source.path / "state.json").is_file():
            rows = datasets.load_from_disk(str(source.path))
            rows = rows.to_iterable_dataset() if streaming else rows
        elif source.path.is_dir():
            rows = datasets.load_dataset(str(source.path), split="train", streaming=streaming)
        else:
            kind = "parquet" if source.text.endswith(".parquet") else "arrow"
            if not glob.glob(source.text):
                raise FileNotFoundError(f"no {kind} file matches {source.text}")
            rows = datasets.load_dataset(kind, data_files=source.text, split="train", streaming=streaming)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data source {text}: {err}") from err
    except ValueError as err:
        raise ValueError(f"data source {text}: {err}") from err
    return rows.decode(False) if streaming else rows


# ---- layouts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Which columns hold a row's conversation and images, and of what kind the image columns are."""

    kind: str  # "trl" | "llava"
    image_columns: dict[str, tuple[bool, str]] = field(default_factory=dict)  # name -> (is a list, image|name|bytes)
    skipped: tuple[str, ...] = ()  # media columns that are neither read nor passed on

    @property
    def text_column(self) -> str:
        return "messages" if self.kind == "trl" else "conversations"


def detect_layout(features: Any, source: str) -> Layout:
    """The layout of a dataset with these ``datasets.Features``; raises ``ValueError`` naming the columns found."""
    columns = list(features)
    if "messages" in columns and "conversations" in columns:
        raise ValueError(f"{source}: both 'messages' (TRL's layout) and 'conversations' (LLaVA's) columns; "
                         "keep one of them")
    if "messages" in columns:
        kind, image_names = "trl", ("images",)
    elif "conversations" in columns:
        kind, image_names = "llava", ("image", "images")
    else:
        raise ValueError(f"{source}: no known record layout: expected 'messages' and 'images' (TRL's conversational "
                         f"layout) or 'conversations' and 'image'/'images' (LLaVA's); found columns: "
                         f"{', '.join(columns)}")
    images = {name: _image_kind(features[name], f"{source}: column '{name}'") for name in image_names
              if name in columns}
    skipped = tuple(c for c in columns if c not in images and _is_media(features[c]))
    return Layout(kind, images, skipped)


def _image_kind(feature: Any, where: str) -> tuple[bool, str]:
    from datasets import Image, LargeList, List, Sequence, Value

    is_list = isinstance(feature, (List, LargeList, Sequence))
    item = feature.feature if is_list else feature
    if isinstance(item, Image):
        return is_list, "image"
    if isinstance(item, Value) and item.dtype in ("string", "large_string"):
        return is_list, "name"
    if isinstance(item, Value) and item.dtype in ("binary", "large_binary"):
        return is_list, "bytes"
    raise ValueError(f"{where} holds {feature}; expected datasets.Image, file names (strings), bytes, "
                     "or a list of them")


def _is_media(feature: Any) -> bool:
    from datasets import Audio, Image, LargeList, List, Sequence, Value, Video

    item = feature.feature if isinstance(feature, (List, LargeList, Sequence)) else feature
    return isinstance(item, (Image, Audio, Video)) or (isinstance(item, Value) and "binary" in item.dtype)


# ---- rows ------------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One dataset row: its text columns and its images (``RowImage``, bytes or file names; ``None`` for an entry
    that holds no image), per image column."""

    source: str
    index: int
    layout: Layout
    columns: dict[str, Any]
    images: dict[str, list[Any] | None]

    @property
    def id(self) -> str:
        return raw_id(self.columns, self.index)

    def to_llava(self) -> tuple[dict[str, Any], list[Any]]:
        """The raw LLaVA record and its images, in marker order; raises :class:`BadRecord`."""
        raw = {k: v for k, v in self.columns.items() if k != "messages" and not (k == "id" and v is None)}
        if self.layout.kind == "trl":
            raw["conversations"] = trl_conversations(self.columns.get("messages"))
        given = [(name, entries) for name, entries in self.images.items() if entries]
        if len(given) > 1:
            raise BadRecord("bad field: both 'image' and 'images' are given")
        name, entries = given[0] if given else ("images", [])
        for i, entry in enumerate(entries):
            if entry is None or entry == "":
                where = f"'{name}'[{i}]" if self.layout.image_columns[name][0] else f"'{name}'"
                raise BadRecord(f"bad field: {where} holds no image (no bytes and no path)")
        return raw, list(entries)

    def record(self) -> Record:
        raw, images = self.to_llava()
        return parse_record(raw, self.source, self.index, images=images)


def trl_conversations(messages: Any) -> list[dict[str, Any]]:
    """TRL messages as LLaVA turns (``from`` / ``value``): content parts joined into one string, each image part
    an ``<image>`` marker in place; raises :class:`BadRecord`."""
    if not isinstance(messages, list) or not messages:
        raise BadRecord("empty conversation: 'messages' missing or empty")
    turns = []
    for t, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"malformed turn: message {t} is not an object")
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):
            content = _join_parts(content, t, role)
        turns.append({"from": role, "value": content})
    return turns


def _join_parts(parts: list[Any], t: int, role: Any) -> str:
    pieces: list[str | None] = []  # None: an image
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"message {t} content[{j}]"
        if kind not in ("image", "text"):
            raise BadRecord(f"malformed turn: {where} is not an image or text part: {part!r:.80}")
        unknown = sorted(k for k, v in part.items() if k not in ("type", "text", "index") and v is not None)
        if unknown:
            raise BadRecord(f"malformed turn: {where} has {', '.join(unknown)}: this layout takes images from the "
                            "'images' column")
        if kind == "image":
            if role != "user":
                raise BadRecord(f"bad placeholder: image part in a {role} message ({where})")
            n_images = pieces.count(None)
            if part.get("index") not in (None, n_images):
                raise BadRecord(f"bad placeholder: {where} is image {n_images} but says index {part['index']}")
            pieces.append(None)
        else:
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRecord(f"non-string value: {where} text is {type(text).__name__}")
            if role == "user" and IMAGE_TOKEN in text:
                raise BadRecord(f"bad placeholder: {where} spells '{IMAGE_TOKEN}' in text; images are parts here")
            pieces.append(text)
    out = ""
    for before, piece in zip([""] + pieces[:-1], pieces):
        sep = "" if not out else "\n" if before is None or piece is None else " "
        out += sep + (IMAGE_TOKEN if piece is None else piece)
    return out


def iter_dataset_rows(text: str) -> Iterator[Row]:
    """Every row of a (non-streamed) dataset source, in order, its embedded images as ``RowImage`` references."""
    rows = load_rows(text)
    layout = detect_layout(rows.features, text)
    image_columns = list(layout.image_columns)
    text_columns = [c for c in rows.column_names if c not in image_columns and c not in layout.skipped]
    stored = StoredImages(rows.select_columns(image_columns).with_format("arrow"), text) if image_columns else None
    text_batches = rows.select_columns(text_columns).iter(batch_size=BATCH_ROWS)
    image_batches = (rows.select_columns(image_columns).with_format("arrow").iter(batch_size=BATCH_ROWS)
                     if image_columns else None)
    start = 0
    for batch in text_batches:
        n = len(batch[text_columns[0]])
        images: dict[str, list[list[Any] | None]] = {}
        if image_batches is not None:
            table = next(image_batches)
            for name, (is_list, kind) in layout.image_columns.items():
                images[name] = _column_entries(table.column(name), is_list, kind, stored, name, start)
        for i in range(n):
            yield Row(text, start + i, layout, {c: batch[c][i] for c in text_columns},
                      {name: entries[i] for name, entries in images.items()})
        start += n


def _column_entries(column: Any, is_list: bool, kind: str, stored: StoredImages, name: str,
                    first_row: int) -> list[list[Any] | None]:
    """Per row of an Arrow image column: its entries (``RowImage`` for bytes, file names, ``None`` when empty),
    read without copying any image's bytes into Python."""
    import pyarrow.compute as pc

    if is_list:  # a row's entries are the flattened items from its offset on
        lengths = [n or 0 for n in pc.list_value_length(column).to_pylist()]
        items = pc.list_flatten(column)
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
    else:  # row r's one entry is item r (none when the row holds null)
        lengths = [1 if valid else 0 for valid in column.is_valid().to_pylist()]
        items, starts = column, list(range(len(lengths)))
    if kind == "image":
        has_bytes = pc.and_(items.is_valid(), pc.struct_field(items, "bytes").is_valid()).to_pylist()
        paths = pc.struct_field(items, "path").to_pylist()
    elif kind == "bytes":
        has_bytes, paths = items.is_valid().to_pylist(), [None] * len(items)
    else:
        has_bytes, paths = [False] * len(items), items.to_pylist()
    out: list[list[Any] | None] = []
    for r, (start, n) in enumerate(zip(starts, lengths)):
        entries = [RowImage(stored, first_row + r, name, i if is_list else None) if has_bytes[start + i]
                   else paths[start + i] for i in range(n)]
        out.append(entries or None)
    return out


def stream_row(text: str, index: int, layout: Layout, values: dict[str, Any]) -> Row:
    """A streamed row (media not decoded): image values become bytes or file names."""
    columns = {k: v for k, v in values.items() if k not in layout.image_columns and k not in layout.skipped}
    images: dict[str, list[Any] | None] = {}
    for name, (is_list, _) in layout.image_columns.items():
        value = values.get(name)
        if value is None:
            images[name] = None
            continue
        images[name] = [_entry(v) for v in value] if is_list else [_entry(value)]
    return Row(text, index, layout, columns, images)


def _entry(value: Any) -> bytes | str | None:
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value
