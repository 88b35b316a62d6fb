"""``phiclip data stats``: what a dataset holds, in records, turns, images and tokens."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data.sources import read_records
from data.template import to_messages


def _histogram(lengths: list[int], max_length: int, bins: int = 10, width: int = 40) -> list[str]:
    edges = np.linspace(0, max(max(lengths), max_length), bins + 1).astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(counts.max(), 1)
    return [
        f"  {edges[i]:6d}-{edges[i + 1]:<6d} {counts[i]:8d} {'#' * int(round(width * counts[i] / top))}"
        for i in range(bins)
    ]


def dataset_stats(data: str | Path, tokenizer: str, max_length: int = 2048) -> str:
    """A printable summary; token lengths use the chat template, image features not counted."""
    from transformers import AutoTokenizer

    from runtime.models import resolve

    records, report = read_records(data)
    tok = AutoTokenizer.from_pretrained(resolve(tokenizer))
    lengths = []
    turns: Counter = Counter()
    for record in tqdm(records, desc="tokenizing", unit="rec", mininterval=1):
        text = tok.apply_chat_template(to_messages(record.turns), tokenize=False)
        lengths.append(len(tok(text, add_special_tokens=False)["input_ids"]))
        turns[sum(t.role == "assistant" for t in record.turns)] += 1
    per_record = Counter(len(r.images) for r in records)
    files = {name for r in records for name in r.images if isinstance(name, str)}
    embedded = sum(not isinstance(image, str) for r in records for image in r.images)
    lines = [
        f"{data}",
        f"records: {len(records)} usable of {report.n_read} read ({len(report.problems)} malformed)",
        f"images: {sum(len(r.images) for r in records)} in {len(records) - per_record[0]} records, "
        f"{len(files)} distinct files, " + (f"{embedded} embedded in the dataset, " if embedded else "")
        + f"{per_record[0]} text-only records",
        "images per record: " + ", ".join(f"{k}: {v}" for k, v in sorted(per_record.items())),
        "answers per record: " + ", ".join(f"{k}: {v}" for k, v in sorted(turns.items())),
    ]
    if lengths:
        arr = np.array(lengths)
        lines.append(
            f"tokens (text only, {tokenizer}): mean {arr.mean():.0f}, median {np.median(arr):.0f},"
            f" p95 {np.percentile(arr, 95):.0f}, max {arr.max()}"
        )
        lines.append(f"records over max_length {max_length} before image tokens: {(arr > max_length).sum()}")
        lines.append("token-length histogram:")
        lines.extend(_histogram(lengths, max_length))
    return "\n".join(lines)
