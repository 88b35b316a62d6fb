"""Prefill and decode tokens/s of PhiClip's ``generate()`` (fp32, LoRA merged) against llama.cpp f16, q8_0 and q4_k_m.

One image question after a chat history (about 600 prompt positions with the defaults), greedy,
exactly ``--new-tokens`` new tokens (end of turn banned in both), ``--threads`` threads for both
(torch, and llama.cpp's ``n_threads`` and ``n_threads_batch``). Rounds alternate the four methods;
the table gives the median and the spread (min-max) of the rounds. llama.cpp runs in the side
environment (``bash scripts/llamacpp_setup.sh``), one process per round, the model loaded and
warmed up before the timed chat. Measure on a quiet machine: llama.cpp's threads spin-wait.

    python benchmarks/gguf.py [--run runs/demo] [--gguf DIR] [--threads 2] [--rounds 3] [--no-repack]
    python benchmarks/gguf.py --run RUN --small   # 8 new tokens, 2 turns, 1 round: seconds (make test-gguf)

The defaults are the settings behind the README's table.

The last line is ``llama.cpp q8_0 decode vs PhiClip: <ratio>x`` (median decode tokens/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

# This file is named gguf.py: with its folder first on the path, `import gguf` (the GGUF library, which the
# export uses) would import this script again. The folder goes last, for benchmarks/generate.py.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from generate import chat_history  # noqa: E402  (benchmarks/generate.py)

from chat.assistant import load_parts, locate  # noqa: E402
from export.gguf import INFO_FILE, export_gguf, probe_picture  # noqa: E402
from export.llamacpp import find_llamacpp  # noqa: E402

QUANTS = ("f16", "Q8_0", "Q4_K_M")
QUESTION = "Describe the image in detail."


def phiclip_round(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds): generate 1 token, then ``new_tokens``; decode = the difference."""
    eos = model.generation_config.eos_token_id

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=eos)
        return time.perf_counter() - start

    one = run(1)
    return one, run(new_tokens) - one


def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo",
                        help="a trained run or PhiClip folder (phiclip demo makes runs/demo)")
    parser.add_argument("--gguf", help="its GGUF export with f16, Q8_0 and Q4_K_M files (default: exported now)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=24, help="earlier Q/A turns in the prompt (24: ~600 positions)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-repack", action="store_true", help="llama.cpp without weight repacking (AMX crash)")
    parser.add_argument("--small", action="store_true", help="8 new tokens, 2 turns, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.small:
        args.new_tokens, args.turns, args.rounds = 8, 2, 1

    torch.set_num_threads(args.threads)
    llama = find_llamacpp()
    where = locate(args.run)
    with tempfile.TemporaryDirectory(prefix="phiclip-bench-gguf-") as scratch:
        work = Path(scratch)
        folder = Path(args.gguf) if args.gguf else export_gguf(args.run, work / "gguf", quants=["q8_0", "q4_k_m"],
                                                               text_route=False)
        info = json.loads((folder / INFO_FILE).read_text())
        name = info["name"]
        files = {q: folder / f"{name}-{q}.gguf" for q in QUANTS}
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise SystemExit(f"missing GGUF files: {', '.join(missing)} (export with --quant q8_0 q4_k_m)")
        mmproj = folder / f"mmproj-{name}-f16.gguf"

        model, processor = load_parts(where, dtype=torch.float32, merge_adapter=True)
        model.eval()
        side = int(model.config.vision_config.image_size)
        picture = probe_picture(side, side)
        picture.save(work / "image.png")
        history = chat_history(args.turns)[:-1]
        messages = [*history, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.render(messages, add_generation_prompt=True)
        inputs = processor(images=[picture], text=prompt, return_tensors="pt")
        positions = inputs["input_ids"].shape[1] - 1 + model.image_token_count()
        phiclip_round(model, inputs, 2)  # warm-up

        request = {"mmproj": str(mmproj), "image": str(work / "image.png"), "question": QUESTION,
                   "history": history, "new_tokens": args.new_tokens, "threads": args.threads,
                   "repack": not args.no_repack}
        timings: dict[str, list[tuple[float, float]]] = {"PhiClip generate() fp32": []}
        timings.update({f"llama.cpp {q.lower()}": [] for q in QUANTS})
        for _ in range(args.rounds):
            timings["PhiClip generate() fp32"].append(phiclip_round(model, inputs, args.new_tokens))
            for q in QUANTS:
                result = llama.runner("bench", {**request, "model": str(files[q])})
                timings[f"llama.cpp {q.lower()}"].append((result["prefill_s"], result["decode_s"]))
        sizes = {"PhiClip generate() fp32": None, **{f"llama.cpp {q.lower()}": files[q].stat().st_size for q in QUANTS}}
        mmproj_size = mmproj.stat().st_size

    decode_n = args.new_tokens - 1
    print(f"model: {args.run}  threads: {args.threads} (torch and llama.cpp n_threads/n_threads_batch)  "
          f"llama-cpp-python {llama.version}  repack: {not args.no_repack}")
    print(f"prompt: {positions} positions (image + {args.turns} earlier turns); {args.new_tokens} new tokens, greedy; "
          f"{args.rounds} alternated rounds, median (min-max)")
    print(f"{'method':<26}{'prefill tok/s':>22}{'decode tok/s':>22}{'LM file MB':>12}")
    decode_rate = {}
    for method, rounds in timings.items():
        prefill = [positions / p for p, _ in rounds]
        decode = [decode_n / d for _, d in rounds]
        decode_rate[method] = statistics.median(decode)
        size = "" if sizes[method] is None else f"{sizes[method] / 2**20:.1f}"
        print(f"{method:<26}{_fmt(prefill):>22}{_fmt(decode):>22}{size:>12}")
    print(f"mmproj: {mmproj_size / 2**20:.1f} MB")
    ratio = decode_rate["llama.cpp q8_0"] / decode_rate["PhiClip generate() fp32"]
    print(f"llama.cpp q8_0 decode vs PhiClip: {ratio:.2f}x")


if __name__ == "__main__":
    main()
