"""Training on a streamed dataset (``data.streaming: true``): rows are read as training needs them.

Each process reads its own part of the stream (``datasets.distributed.split_dataset_by_node``: whole shards when
their number divides by the processes, else every n-th row). Rows come in blocks of ``data.shuffle_buffer`` in the
dataset's stored order; each block is shuffled with a permutation drawn from the seed, the epoch and the block's
number, and the stream starts over, reshuffled, when it ends (``train.max_steps`` bounds the run). So a position
is (epoch, block, rows of the block taken, the source's ``state_dict()`` at the block's start): every batch carries
the position after its last row (``STREAM_STATE``), the trainer saves it with each checkpoint, and a resumed run
re-reads one block and continues with the very row that came next.

Rows are parsed, tokenized and their images prepared in ``train.dataloader_workers`` processes (a pool fed in
stream order, a bounded number of rows ahead; the data loader itself runs in the training process), so results
come back in stream order whatever the number of workers. A row that cannot train is reported (its ``id``, or
``#N``: its index in this process's stream, the dataset's row index on one process) and skipped; the report
covers the first pass over the stream.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from data.dataset import STREAM_STATE, Encoder
from data.hf_records import Layout, Row, detect_layout, load_rows, stream_row
from data.records import BadRecord, Problem, Report
from processing_phiclip import ImageError

AHEAD_PER_WORKER = 4  # rows in flight per worker process


class StreamingLlavaDataset(torch.utils.data.IterableDataset):
    """Training items of a streamed dataset, endlessly (epoch after epoch), with their stream position."""

    def __init__(self, rows: Any, layout: Layout, encoder: Encoder, report: Report, *, source: str, seed: int,
                 block_rows: int, workers: int, exclude_ids: set[str] = frozenset(), exclude_reason: str = "") -> None:
        if block_rows < 1:
            raise ValueError(f"data.shuffle_buffer must be at least 1, got {block_rows}")
        self.rows = rows  # a datasets.IterableDataset: this process's part of the stream, media not decoded
        self.layout = layout
        self.encoder = encoder
        self.report = report
        self.source = source
        self.seed = seed
        self.block_rows = block_rows
        self.workers = workers
        self.exclude = (set(exclude_ids), exclude_reason)
        self.start: dict[str, Any] | None = None  # a checkpoint's position to resume from

    @property
    def n_image_tokens(self) -> int:
        return self.encoder.n_image_tokens

    def checkpoint(self, position: dict[str, Any] | None) -> dict[str, Any]:
        """What a checkpoint keeps of this process's stream: the position after the last batch trained, the report."""
        return {"position": position, "report": self.report.to_dict()}

    def load_checkpoint(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`'s output: at its position, with its report."""
        self.start = saved["position"]
        report = saved["report"]
        self.report.n_read, self.report.n_kept = report["n_read"], report["n_kept"]
        self.report.problems = [Problem(**p) for p in report["problems"]]
        self.report.notes = Counter(report["notes"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = self.start
        epoch = position["epoch"] if position else 0
        while True:
            produced = False
            for item in self._items(self.pass_rows(epoch, position)):
                produced = True
                yield item
            if not produced and position is None:
                raise ValueError(f"{self.source}: no usable row in the stream:\n{self.report.summary()}")
            position, epoch = None, epoch + 1

    def pass_rows(self, epoch: int, position: dict[str, Any] | None = None) -> Iterator[tuple[Row, dict[str, Any]]]:
        """``(row, position after it)`` of one pass over this process's stream, from ``position`` on."""
        self.rows.set_epoch(epoch)
        first, skip = 0, 0
        if position is not None:
            first, skip = position["block"], position["offset"]
            if position["rows"] is not None:
                self.rows.load_state_dict(position["rows"])
        blocks = self.rows.iter(batch_size=self.block_rows)
        for block in range(first, 1 << 62):
            if position is not None and block == first:
                before = position["rows"]
            else:
                before = self.rows.state_dict() if block > 0 else None
            try:
                batch = next(blocks)
            except StopIteration:
                return
            n = len(next(iter(batch.values())))
            order = np.random.default_rng([self.seed, epoch, block]).permutation(n)
            for k in range(skip if block == first else 0, n):
                i = int(order[k])
                values = {c: v[i] for c, v in batch.items()}
                row = stream_row(self.source, block * self.block_rows + i, self.layout, values)
                yield row, {"epoch": epoch, "block": block, "offset": k + 1, "rows": before}

    def _items(self, rows: Iterator[tuple[Row, dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        for row, position, (item, reason) in self._built(rows):
            first_pass = position["epoch"] == 0
            if first_pass:
                self.report.n_read += 1
            if item is None:
                if first_pass:
                    self.report.skip(row.source, row.id, reason)
                continue
            if first_pass:
                self.report.n_kept += 1
            item[STREAM_STATE] = position
            yield item

    def _built(self, rows: Iterator[tuple[Row, dict[str, Any]]]) -> Iterator[tuple[Row, dict, tuple]]:
        """``(row, position, build_item's answer)`` in stream order, built here or in the worker pool."""
        if self.workers == 0:
            for row, position in rows:
                yield row, position, build_item(self.encoder, self.exclude, row)
            return
        # fork: the workers inherit the encoder (processor, tokenizer) instead of unpickling it
        context = multiprocessing.get_context("fork")
        with context.Pool(self.workers, _start_worker, (self.encoder, self.exclude)) as pool:
            pending: deque = deque()
            for row, position in rows:
                pending.append((row, position, pool.apply_async(_build_in_worker, (row,))))
                if len(pending) >= self.workers * AHEAD_PER_WORKER:
                    row, position, result = pending.popleft()
                    yield row, position, result.get()
            while pending:
                row, position, result = pending.popleft()
                yield row, position, result.get()


def build_item(encoder: Encoder, exclude: tuple[set[str], str], row: Row) -> tuple[dict | None, str]:
    """A row's training item, or ``(None, reason)`` when it cannot train."""
    try:
        record = row.record()
        if record.id in exclude[0]:
            return None, exclude[1]
        example = encoder.encode(record)
        return encoder.item(example, [encoder.pixels(image) for image in example.images]), ""
    except (BadRecord, ImageError) as err:
        return None, str(err)


_WORKER: dict[str, Any] = {}


def _start_worker(encoder: Encoder, exclude: tuple[set[str], str]) -> None:
    torch.set_num_threads(1)
    _WORKER.update(encoder=encoder, exclude=exclude)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    """End this worker when the training process is gone (killed, it cannot end its pool)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


def _build_in_worker(row: Row) -> tuple[dict | None, str]:
    return build_item(_WORKER["encoder"], _WORKER["exclude"], row)


def open_stream(source: str, encoder: Encoder, report: Report, *, seed: int, block_rows: int, workers: int,
                max_rows: int = 0, rank: int = 0, world: int = 1, exclude_ids: set[str] = frozenset(),
                exclude_reason: str = "") -> StreamingLlavaDataset:
    """This process's stream of ``source`` (first ``max_rows`` rows only, if given)."""
    from datasets.distributed import split_dataset_by_node

    rows = load_rows(source, streaming=True)
    if rows.features is None:
        raise ValueError(f"{source}: the stream does not say its columns (no features), so its layout is unknown")
    layout = detect_layout(rows.features, source)
    if max_rows:
        rows = rows.take(max_rows)
    name = source
    if world > 1:
        rows = split_dataset_by_node(rows, rank=rank, world_size=world)
        name = f"{source} (stream of rank {rank} of {world})"
    return StreamingLlavaDataset(rows, layout, encoder, report, source=name, seed=seed, block_rows=block_rows,
                                 workers=workers, exclude_ids=exclude_ids, exclude_reason=exclude_reason)
