"""Tokens/s of ``generate()`` (KV cache) against re-running the full forward for every token.

The second is what the original recipe did (no ``generate``, no cache). Same model, same
prompt with an image, 64 new tokens each (EOS ignored so both produce exactly 64). Two prompts:
one question, and the same question after three earlier turns about the image (a chat with
history, where re-running the whole sequence for every token costs the most). The last line
is the speedup on the chat prompt.

    python benchmarks/generate.py [--run runs/demo] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image

from chat.assistant import VisionChat


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
    parser.add_argument("--run", default="runs/demo", help="a trained run directory (phiclip demo makes runs/demo)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    chat = VisionChat.load(args.run)
    image = Image.new("RGB", (64, 64), (220, 40, 40))
    question = {"role": "user", "content": "Describe the image in detail."}
    history = [
        {"role": "user", "content": "What color is the shape?"},
        {"role": "assistant", "content": "The shapes are red."},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "There are 2 shapes."},
        {"role": "user", "content": "Which side are the shapes on?"},
        {"role": "assistant", "content": "They are on the left."},
    ]
    model = chat.model
    n = args.new_tokens
    print(f"model: {args.run}  device: {chat.device}  threads: {torch.get_num_threads()}")
    print(f"{n} new tokens, {chat.n_image_tokens} image tokens per prompt, best of {args.repeats}")
    print(f"{'prompt':<26}{'tokens':>7}{'no cache s':>12}{'tok/s':>8}{'generate s':>12}{'tok/s':>8}{'speedup':>9}{'same':>6}")
    for name, messages in (("one question", [question]), ("question after 3 turns", history + [question])):
        inputs = chat.model_inputs([messages], [image])
        cached_generate(model, inputs, 2)  # warm-up
        t_cache, out_cache = timed(lambda: cached_generate(model, inputs, n), args.repeats)
        t_naive, out_naive = timed(lambda: naive_loop(model, inputs, n), args.repeats)
        same = torch.equal(out_cache[:, -n:], out_naive[:, -n:])
        speedup = t_naive / t_cache
        print(f"{name:<26}{inputs['input_ids'].shape[1]:>7}{t_naive:>12.2f}{n / t_naive:>8.1f}"
              f"{t_cache:>12.2f}{n / t_cache:>8.1f}{speedup:>8.2f}x{str(same):>6}")
    print(f"speedup: {speedup:.2f}x")

if __name__ == "__main__":
    main()
