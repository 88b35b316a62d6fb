"""Tokens/s of ``generate()`` (KV cache) against re-running the full forward for every token.

The second is what the original recipe did (no ``generate``, no cache). Same model, same
prompt with an image, 64 new tokens each (EOS ignored so both produce exactly 64).

    python benchmarks/generate.py [--run runs/demo] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from vlmtune.infer.chat import VisionChat


def naive_loop(model, inputs: dict, n_new: int) -> torch.Tensor:
    """Greedy decoding by full forwards; EOS is masked, as ``min_new_tokens`` does in ``generate``."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    eos = model.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos])
    for _ in range(n_new):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False).logits
        last = logits[:, -1].clone()
        last[:, eos] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def cached_generate(model, inputs: dict, n_new: int) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                          temperature=None, top_p=None, top_k=None,
                          pad_token_id=model.generation_config.pad_token_id)


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a trained run directory (vlmtune demo makes runs/demo)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    chat = VisionChat.from_run(args.run)
    image = Image.new("RGB", (64, 64), (220, 40, 40))
    inputs = chat.model_inputs([[{"role": "user", "content": "Describe the image in detail."}]], [image])
    model = chat.model
    n = args.new_tokens
    cached_generate(model, inputs, 2)  # warm-up
    t_cache, out_cache = timed(lambda: cached_generate(model, inputs, n), args.repeats)
    t_naive, out_naive = timed(lambda: naive_loop(model, inputs, n), args.repeats)
    same = torch.equal(out_cache[:, -n:], out_naive[:, -n:])

    prompt_len = inputs["input_ids"].shape[1]
    print(f"model: {args.run}  device: {chat.device}  threads: {torch.get_num_threads()}")
    print(f"prompt length: {prompt_len} tokens ({chat.n_image_tokens} image tokens), new tokens: {n}, best of {args.repeats}")
    print(f"{'method':<34}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'full forward per token (no cache)':<34}{t_naive:>10.3f}{n / t_naive:>12.1f}")
    print(f"{'generate() with KV cache':<34}{t_cache:>10.3f}{n / t_cache:>12.1f}")
    print(f"same tokens: {same}")
    print(f"speedup: {t_naive / t_cache:.2f}x")


if __name__ == "__main__":
    main()
