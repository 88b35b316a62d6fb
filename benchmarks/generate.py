"""Tokens/s of PhiClip's ``generate()`` against transformers' ``generate(inputs_embeds=...)`` and the recipe's loop.

Three ways to answer the same prompt (an image and a chat history, about 600 positions in the
LM), greedy, the same number of new tokens (EOS masked as ``min_new_tokens`` does, so all
produce exactly ``--new-tokens``):

- PhiClip: the model's own ``generate()`` (splice once, prefill, one token at a time with a KV cache);
- transformers: ``language_model.generate(inputs_embeds=...)`` on the same spliced embeddings;
- recipe loop: what the original recipe did, a full forward over the whole sequence for every token.

The three methods alternate, ``--rounds`` times; the table gives each one's median time with the
spread (min-max) over rounds and its ratio to PhiClip. It checks that all three produce the same
tokens and ends with ``vs transformers generate: <x>`` (PhiClip / transformers tokens/s) and
``speedup: <x>`` (PhiClip / recipe loop), both from the medians.

    python benchmarks/generate.py [--run runs/demo] [--new-tokens 128] [--turns 24] [--rounds 3]
    python benchmarks/generate.py --run RUN --small   # 8 new tokens, 2 turns, 1 round: seconds (make test)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from chat.assistant import VisionChat


def eos_ids(model) -> torch.Tensor:
    eos = model.generation_config.eos_token_id
    return torch.tensor(eos if isinstance(eos, list) else [eos])


def phiclip_generate(model, inputs: dict, n: int) -> torch.Tensor:
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:]


def transformers_generate(model, inputs: dict, n: int) -> torch.Tensor:
    features = model.get_image_features(inputs["pixel_values"])
    spliced = model.splice(inputs["input_ids"], features, inputs["attention_mask"], padding_side="left")
    return model.language_model.generate(
        inputs_embeds=spliced["inputs_embeds"], attention_mask=spliced["attention_mask"], max_new_tokens=n,
        min_new_tokens=n, do_sample=False, temperature=None, top_p=None, top_k=None,
        pad_token_id=model.generation_config.pad_token_id,
    )[:, -n:]


def recipe_loop(model, inputs: dict, n: int) -> torch.Tensor:
    """Greedy decoding by full forwards over the whole sequence, no cache; EOS masked like ``min_new_tokens``."""
    ids, mask, eos = inputs["input_ids"], inputs["attention_mask"], eos_ids(model)
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"], use_cache=False).logits
        last = logits[:, -1].clone()
        last[:, eos] = float("-inf")
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, -n:]


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - start, out


def chat_history(turns: int) -> list[dict[str, str]]:
    questions = ["What color is the shape?", "How many shapes are there?", "Which side are the shapes on?",
                 "What shape is it?"]
    answers = ["The shapes are red.", "There are 2 shapes.", "They are on the left.", "It is a circle."]
    messages = []
    for i in range(turns):
        messages += [{"role": "user", "content": questions[i % 4]}, {"role": "assistant", "content": answers[i % 4]}]
    return messages + [{"role": "user", "content": "Describe the image in detail."}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="a trained run or PhiClip folder (phiclip demo makes runs/demo)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--turns", type=int, default=24, help="earlier Q/A turns in the prompt (24: ~600 positions)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three methods, alternated")
    parser.add_argument("--small", action="store_true", help="8 new tokens, 2 turns, 1 round: a check that it runs")
    args = parser.parse_args()
    if args.small:
        args.new_tokens, args.turns, args.rounds = 8, 2, 1

    chat = VisionChat.load(args.run)
    model, n = chat.model, args.new_tokens
    messages = chat_history(args.turns)
    inputs = chat.model_inputs([messages], [Image.new("RGB", (64, 64), (220, 40, 40))])
    positions = chat.prompt_length(messages, n_images=1)
    print(f"model: {args.run}  device: {chat.device}  threads: {torch.get_num_threads()}")
    print(f"prompt: {positions} positions ({chat.n_image_tokens} image, {args.turns} earlier turns); "
          f"{n} new tokens, greedy; {args.rounds} round(s), the methods alternated")
    methods = {
        "PhiClip generate()": lambda: phiclip_generate(model, inputs, n),
        "transformers generate(inputs_embeds)": lambda: transformers_generate(model, inputs, n),
        "recipe loop (full forward per token)": lambda: recipe_loop(model, inputs, n),
    }
    phiclip_generate(model, inputs, 2)  # warm-up
    transformers_generate(model, inputs, 2)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    tokens: dict[str, torch.Tensor] = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            took, tokens[name] = timed(fn)
            seconds[name].append(took)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    ours = median["PhiClip generate()"]
    print(f"{'method':<40}{'seconds':>9}{'spread':>15}{'tok/s':>8}{'vs PhiClip':>12}")
    for name, times in seconds.items():
        spread = f"{min(times):.2f}-{max(times):.2f}"
        print(f"{name:<40}{median[name]:>9.2f}{spread:>15}{n / median[name]:>8.1f}{median[name] / ours:>11.2f}x")
    first, *others = tokens.values()
    same = all(torch.equal(first, out) for out in others)
    print(f"same tokens from all three: {same}")
    if not same:
        raise SystemExit("the three methods disagree: the comparison is void")
    print(f"vs transformers generate: {median['transformers generate(inputs_embeds)'] / ours:.2f}x")
    print(f"speedup: {median['recipe loop (full forward per token)'] / ours:.2f}x")


if __name__ == "__main__":
    main()
