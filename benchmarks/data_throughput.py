"""Data throughput: records/s that reach the collator from LLaVA JSON + JPEG files, from parquet with the JPEGs
embedded, and from the same parquet streamed.

Every record is one COCO-sized JPEG (640x480, ~100 KB, a smooth picture with noise, quality 90) and a two-turn
conversation. A record is delivered when it has been decoded, prepared (pad to square, the CLIP-336 image
processor: resize, normalise) and tokenized (the template, labels) and the collator has batched it (batch 8):
what training waits for. The paths:

- ``json``: ``read_records`` of the JSON, ``LlavaDataset`` (images opened from the files), a ``DataLoader``;
- ``parquet``: the same records written by ``phiclip data to-parquet`` (``prepare.parquet.write_parquet``), read
  into the ``datasets`` Arrow cache, ``LlavaDataset`` reading each image's bytes from the memory-mapped cache;
- ``stream``: that parquet folder as ``data.streaming`` reads it (``data.streaming``: blocks of 256 rows, rows
  parsed, tokenized and decoded in the worker pool, the data loader in the main process).

With W workers the map-style paths use a ``DataLoader`` with W worker processes, the stream its pool of W. Each
(path, workers) pair is timed from its first batch to its last (worker start-up and reading/tokenizing the records
up front are one-off costs, reported apart as ``setup s``), the pairs alternating, ``--rounds`` times; the table
gives the median records/s with the spread (min-max) over rounds and the ratio to ``json`` at the same workers.
It ends with the single-process cost of one image (open + prepare + processor, median of ``--records`` images)
and the ratio ``parquet / json`` at 0 workers (the floor is 0.9).

    python benchmarks/data_throughput.py [--records 512] [--rounds 3] [--workers 0,4] [--tokenizer NAME]
    python benchmarks/data_throughput.py --small   # 16 records, 1 round, workers 0,1: seconds (make test)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

BATCH = 8
IMAGE_SIZE = (640, 480)
BLOCK_ROWS = 256
PATHS = ("json", "parquet", "stream")


def jpeg(seed: int) -> bytes:
    """A COCO-like JPEG: a smooth colour field with shapes of texture and sensor noise."""
    rng = np.random.default_rng(seed)
    w, h = IMAGE_SIZE
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / rng.uniform(30, 90) + c) * np.cos(y / rng.uniform(30, 90) - c)
                     for c in rng.uniform(0, 6, 3)], axis=-1)
    noise = rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_data(root: Path, n: int) -> tuple[Path, Path, Path]:
    """The JSON + JPEG files, and the parquet folder made from them."""
    from prepare.parquet import write_parquet

    images = root / "images"
    images.mkdir()
    records = []
    for i in range(n):
        (images / f"{i:012d}.jpg").write_bytes(jpeg(i))
        records.append({"id": f"r{i}", "image": f"{i:012d}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in this picture? Describe the colours."},
            {"from": "gpt", "value": f"Waves of colour, number {i}, with fine grain all over the picture."},
            {"from": "human", "value": "Is it a photograph?"},
            {"from": "gpt", "value": "It looks like one, but it is a generated pattern."}]})
    data = root / "train.json"
    data.write_text(json.dumps(records))
    write_parquet(data, images, root / "parquet")
    return data, images, root / "parquet"


def processor(tokenizer_name: str):
    """A tokenizer (SmolLM2's by default, offline) and CLIP ViT-L/14-336's image processor settings, padded to
    square."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from processing_phiclip import PhiClipProcessor
    from runtime.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_name))
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return PhiClipProcessor.from_parts(images, tokenizer, image_aspect="pad")


def dataset(path: str, source: Path, images: Path, proc, workers: int):
    """The dataset training would build for ``path``; returns it and the seconds it took (reading, tokenizing)."""
    from data.dataset import Encoder, LlavaDataset
    from data.images import ImageResolver
    from data.records import Report
    from data.sources import read_records
    from data.streaming import open_stream

    started = time.perf_counter()
    n_tokens = (336 // 14) ** 2
    if path == "stream":
        encoder = Encoder(proc, ImageResolver(""), n_tokens, 2048)
        data = open_stream(str(source), encoder, Report(), seed=0, block_rows=BLOCK_ROWS, workers=workers)
    else:
        records, report = read_records(source)
        data = LlavaDataset(records, processor=proc, resolver=ImageResolver(images if path == "json" else ""),
                            n_image_tokens=n_tokens, max_length=2048, report=report)
    return data, time.perf_counter() - started


def measure(data, n: int, workers: int, pad_id: int) -> float:
    """Records/s delivered by the collator, from the first batch to the ``n``-th record."""
    from data.dataset import Collator
    from data.streaming import StreamingLlavaDataset

    streamed = isinstance(data, StreamingLlavaDataset)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, collate_fn=Collator(pad_id),
                                         num_workers=0 if streamed else workers)
    delivered, started = 0, None
    for batch in loader:
        if started is None:
            started = time.perf_counter()  # after start-up: the first batch is not counted
        else:
            delivered += len(batch["input_ids"])
        if delivered + BATCH >= n:
            break
    return delivered / (time.perf_counter() - started)


def image_cost(images: Path, proc, n: int) -> float:
    """Median milliseconds to open, prepare and process one image in this process."""
    times = []
    for path in sorted(images.iterdir())[:n]:
        started = time.perf_counter()
        proc.image_pixels([path])
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="0,4", help="comma-separated worker counts")
    parser.add_argument("--tokenizer", default="offline:smollm2-135m-instruct", help="Hub name, path or offline:NAME")
    parser.add_argument("--small", action="store_true", help="16 records, 1 round, workers 0,1")
    args = parser.parse_args()
    if args.small:
        args.records, args.rounds, args.workers = 16, 1, "0,1"
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="phiclip-data-bench-") as tmp:
        root = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(root / "hf-datasets-cache")
        import datasets

        datasets.config.HF_DATASETS_CACHE = root / "hf-datasets-cache"
        datasets.disable_progress_bars()
        data, images, parquet = write_data(root, args.records)
        proc = processor(args.tokenizer)
        sources = {"json": data, "parquet": parquet, "stream": parquet}
        rates: dict[tuple[str, int], list[float]] = {}
        setup: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for w in workers:
                for path in PATHS:
                    built, seconds = dataset(path, sources[path], images, proc, w)
                    setup.setdefault((path, w), []).append(seconds)
                    rates.setdefault((path, w), []).append(measure(built, args.records, w, proc.tokenizer.pad_token_id))
        per_image = image_cost(images, proc, args.records)
    print(f"{args.records} records (one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG each), batch {BATCH}, "
          f"{args.rounds} round(s), {os.cpu_count()} CPU(s)")
    print(f"{'path':8} {'workers':>7} {'records/s':>10} {'spread':>15} {'vs json':>8} {'setup s':>8}")
    for w in workers:
        base = statistics.median(rates[("json", w)])
        for path in PATHS:
            r = rates[(path, w)]
            print(f"{path:8} {w:7d} {statistics.median(r):10.1f} {f'{min(r):.1f}-{max(r):.1f}':>15} "
                  f"{statistics.median(r) / base:7.2f}x {statistics.median(setup[(path, w)]):8.2f}")
    print(f"per-image cost (open + prepare + processor, one process): {per_image:.1f} ms")
    ratio = statistics.median(rates[("parquet", workers[0])]) / statistics.median(rates[("json", workers[0])])
    print(f"parquet / json at {workers[0]} workers: {ratio:.2f}x (floor 0.9x)")


if __name__ == "__main__":
    main()
