"""Training throughput: PhiClip's training path against the plain transformers ``Trainer`` recipe (and TRL's).

The same model (SmolLM2-135M-Instruct + the demo's shapes tower, projector from the same fixed-seed
init) trains on the same samples (the first ``--samples`` records of the demo's shapes data, each an
image with its first question and answer; ``--turns 0`` keeps all four question/answer pairs of a
record, as they come; answers and their end-of-turn token are supervised), batch 8, LoRA r=16 (alpha 32, no dropout) on every linear layer of the LM and the
projector trained, fp32, the demo's optimiser settings:

- ``phiclip``: ``train.run.train`` on ``configs/demo.yaml``, as ``phiclip train`` runs it
  (``PhiClipTrainer``, ``LlavaDataset``, ``Collator``);
- ``plain``: transformers ``Trainer`` on the equivalent ``LlavaForConditionalGeneration``
  (``export.checkpoint.to_llava`` of a freshly built, untrained PhiClip model), PEFT LoRA on the LM's
  linears with the projector in ``modules_to_save``, and a hand-written collator that renders the
  chat, runs ``LlavaProcessor`` and masks everything but the answers;
- ``trl``: TRL's ``SFTTrainer`` VLM recipe on that Llava model (``assistant_only_loss`` with a
  ChatML template carrying ``{% generation %}`` markers, ``peft_config``; its bf16 and gradient
  checkpointing defaults switched off), when TRL is installed.

Each tool runs in a fresh subprocess, the tools alternating, ``--rounds`` times; every run takes
``--warmup`` untimed steps and then ``--steps`` timed ones (a step's time is the wall time from the
end of the previous step: loading and collating its batch, forward, backward, optimiser, logging).
The table gives per tool: median step time, samples/s, real tokens per sample (an image counting as
its features), padded tokens per sample (the positions the LM ran: rows x longest row, so padding
included and the columns PhiClip cuts off after the last answer not), supervised tokens per sample,
real tokens/s, peak RSS, and utilisation = 4 x LM parameters x real tokens/s / the fp32 matmul peak
measured here (a large ``torch.mm``). Two loss checks: before
training, each tool's untrained model computes ``model(**batch).loss`` on the data's first 8
samples through its own collator, and the values must agree across tools (same model, same data;
the first logged losses are printed too, but PhiClip's length-grouped sampler starts on another
batch); and each tool's first logged loss must equal ``model(**batch).loss`` on that step's batch
(PhiClip's loss is computed another way, see ``train/loss.py``). It ends with ``speedup: <x>``,
PhiClip samples/s / plain Trainer samples/s.

    python benchmarks/train_throughput.py [--steps 30] [--warmup 2] [--rounds 2] [--turns 1] [--tools phiclip,plain,trl]
    python benchmarks/train_throughput.py --small   # 16 samples, 2 steps, 1 round, phiclip and plain (make test)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from train_probe import Probe, lm_parameters  # this script's folder is on sys.path
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PROMPT = "You answer questions about images."  # configs/demo.yaml's
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
LM_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
SEED = 42
# SmolLM2's ChatML with the answer and its <|im_end|> inside generation markers (TRL's assistant_only_loss).
CHATML_TRAINING = (
    "{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content -%}{%- if part['type'] == 'image' -%}<image>{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{ text(message['content']) + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{%- else -%}{{ text(message['content']) + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def demo_config(workdir: Path, args: argparse.Namespace, overrides: list[str]):
    from offline.cache import cache_dir
    from runtime.config import load_config

    return load_config(ROOT / "configs" / "demo.yaml", [
        f"data.train={args.data}", f"data.images={cache_dir() / 'shapes-data' / 'images'}",
        f"train.output_dir={workdir / 'run'}", f"train.batch_size={args.batch}", "train.grad_accum=1",
        f"train.max_steps={args.warmup + args.steps}", "train.save_steps=100000", "train.logging_steps=1",
        f"train.seed={SEED}", f"lora.r={LORA['r']}", f"lora.alpha={LORA['lora_alpha']}",
        f"lora.dropout={LORA['lora_dropout']}", f"data.system_prompt={SYSTEM_PROMPT}", *overrides,
    ])


def run_phiclip(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from train.run import train

    cfg = demo_config(workdir, args, args.phiclip_override)
    probe = Probe(image_tokens=1)
    counted: dict[str, int] = {}

    class Setup(TrainerCallback):  # the model exists only inside train(): read what the probe needs from it
        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            probe.image_token_id = model.config.image_token_id
            probe.image_tokens = model.image_token_count()
            counted["lm_params"] = lm_parameters(model)

    train(cfg, callbacks=[Setup(), probe])
    return probe.result(args.warmup, counted["lm_params"])


# ---- the plain recipe ---------------------------------------------------------------------------


def llava_and_processor(workdir: Path, args: argparse.Namespace):
    """The PhiClip demo model, freshly built and untrained, as a standard Llava model, with a LlavaProcessor."""
    from transformers import AutoTokenizer

    from export.checkpoint import make_processor, to_llava
    from train.build import IMAGE_TOKEN, build_model

    cfg = demo_config(workdir, args, [])
    built = build_model(cfg.model, system_prompt=SYSTEM_PROMPT)
    lm_params = lm_parameters(built.model)
    tokenizer = AutoTokenizer.from_pretrained(built.model.config.text_model)  # the LM's own, ChatML template
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    llava = to_llava(built.model)
    processor = make_processor(tokenizer, built.image_processor, llava.config.vision_config,
                               llava.config.vision_feature_select_strategy, built.n_image_tokens)
    return llava.train(), processor, lm_params, cfg


def chat_samples(cfg) -> list[dict[str, Any]]:
    """The records as chat messages (system prompt first) and the image's path."""
    from data.sources import read_records

    records, _ = read_records(cfg.data.train)
    samples = []
    for record in records:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages += [{"role": t.role, "content": t.content.strip()} for t in record.turns]
        samples.append({"messages": messages, "image": str(Path(cfg.data.images) / record.images[0])})
    return samples


class PromptMaskingCollator:
    """Render each chat, let LlavaProcessor expand ``<image>`` and pad; supervise only the answers (+ <|im_end|>)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from PIL import Image

        tokenizer = self.processor.tokenizer
        texts = [tokenizer.apply_chat_template(s["messages"], tokenize=False) for s in samples]
        images = [Image.open(s["image"]).convert("RGB") for s in samples]
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        labels = torch.full_like(batch["input_ids"], -100)
        width = len(self.header)
        for row, ids in enumerate(batch["input_ids"].tolist()):
            at = 0
            while at < len(ids):
                if ids[at:at + width] == self.header:
                    start = at + width
                    stop = ids.index(self.end, start) + 1
                    labels[row, start:stop] = batch["input_ids"][row, start:stop]
                    at = stop
                else:
                    at += 1
        batch["labels"] = labels
        return batch


def training_arguments(cls, cfg, workdir: Path, **extra):
    t = cfg.train
    return cls(
        output_dir=str(workdir / "out"), per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, max_steps=t.max_steps,
        logging_steps=1, save_strategy="no", seed=SEED, data_seed=SEED, use_cpu=True, report_to="none",
        remove_unused_columns=False, dataloader_num_workers=0, **extra,
    )


def run_plain(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    llava, processor, lm_params, cfg = llava_and_processor(workdir, args)
    model = get_peft_model(llava, LoraConfig(**LORA, target_modules=LM_LINEARS,
                                             modules_to_save=["multi_modal_projector"]))
    probe = Probe(image_tokens=1)
    probe.image_token_id = llava.config.image_token_id
    trainer = Trainer(model=model, args=training_arguments(TrainingArguments, cfg, workdir),
                      train_dataset=chat_samples(cfg), data_collator=PromptMaskingCollator(processor),
                      callbacks=[probe])
    trainer.train()
    return probe.result(args.warmup, lm_params)


def content_parts(text: str) -> list[dict[str, str | None]]:
    """TRL's typed message content, the image part where ``<image>`` stands in the text."""
    before, image, after = text.partition("<image>")
    parts = [{"type": "text", "text": before}] if before else []
    if image:
        parts.append({"type": "image", "text": None})
        parts += [{"type": "text", "text": after}] if after else []
    return parts


def run_trl(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset, Image, Sequence
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    llava, processor, lm_params, cfg = llava_and_processor(workdir, args)
    rows = [{"messages": [{"role": m["role"], "content": content_parts(m["content"])} for m in sample["messages"]],
             "images": [sample["image"]]} for sample in chat_samples(cfg)]
    dataset = Dataset.from_list(rows).cast_column("images", Sequence(Image()))
    template = workdir / "chatml_training.jinja"
    template.write_text(CHATML_TRAINING)
    # SFTConfig defaults to bf16 and gradient checkpointing: off, for the same fp32 setup as the others.
    sft = training_arguments(SFTConfig, cfg, workdir, assistant_only_loss=True, chat_template_path=str(template),
                             max_length=None, bf16=False, gradient_checkpointing=False)
    probe = Probe(image_tokens=1)
    probe.image_token_id = llava.config.image_token_id
    trainer = SFTTrainer(model=llava, args=sft, train_dataset=dataset, processing_class=processor,
                         peft_config=LoraConfig(**LORA, target_modules=LM_LINEARS,
                                                modules_to_save=["multi_modal_projector"]),
                         callbacks=[probe])
    trainer.train()
    return probe.result(args.warmup, lm_params)


WORKERS = {"phiclip": run_phiclip, "plain": run_plain, "trl": run_trl}


# ---- the driver ---------------------------------------------------------------------------------


def cpu_matmul_peak() -> float:
    """fp32 ``torch.mm`` 4096^2 rate of this process's threads, FLOP/s, measured as gpu_check measures a GPU's."""
    from gpu_check import matmul_peak  # this script's folder is on sys.path

    return matmul_peak(torch.device("cpu"), torch.float32, n=4096, repeats=2)


def write_samples(folder: Path, n: int, turns: int) -> Path:
    """The shapes data's first ``n`` records, each cut to its first ``turns`` question/answer pairs (0: all)."""
    from offline.cache import cache_dir

    records = json.loads((cache_dir() / "shapes-data" / "train.json").read_text())[:n]
    if turns:
        records = [{**r, "conversations": r["conversations"][:2 * turns]} for r in records]
    path = folder / "samples.json"
    path.write_text(json.dumps(records))
    return path


def worker_command(tool: str, result: Path, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--worker", tool, "--result", str(result), "--data", str(args.data),
               "--batch", str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    for item in args.phiclip_override:
        command += ["--phiclip-override", item]
    return command


def summarise(runs: list[dict[str, Any]], batch: int, peak: float) -> dict[str, float]:
    steps = [t for run in runs for t in run["step_times"]]
    median = statistics.median(steps)
    real = statistics.fmean(run["real"] for run in runs)
    tokens_per_s = real * batch / median
    return {
        "step": median, "samples_s": batch / median, "real": real,
        "padded": statistics.fmean(run["padded"] for run in runs),
        "supervised": statistics.fmean(run["supervised"] for run in runs),
        "tokens_s": tokens_per_s, "rss": max(run["peak_rss_mb"] for run in runs),
        "util": 4 * runs[0]["lm_params"] * tokens_per_s / peak,
    }


def drive(args: argparse.Namespace) -> None:
    tools = [t for t in args.tools.split(",") if t]
    if "trl" in tools and importlib.util.find_spec("trl") is None:
        print("trl: not installed beside this transformers; its column is left out")
        tools.remove("trl")
    peak = cpu_matmul_peak()
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.data = write_samples(Path(tmp), args.samples, args.turns)
        runs = [(r, tool) for r in range(args.rounds) for tool in tools]
        for r, tool in tqdm(runs, desc="runs", unit="run"):
            result = Path(tmp) / f"{tool}-{r}.json"
            done = subprocess.run(worker_command(tool, result, args), cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{tool} (round {r + 1}) failed:\n{done.stderr[-4000:]}")
            results[tool].append(json.loads(result.read_text()))
            loads.append(os.getloadavg()[0])
    peak = max(peak, cpu_matmul_peak())

    rows = {tool: summarise(runs, args.batch, peak) for tool, runs in results.items()}
    shape = f"its first {args.turns} question/answer pair(s)" if args.turns else "all 4 question/answer pairs"
    print(f"\n{args.samples} samples (shapes data: an image and {shape}), batch {args.batch}, LoRA r={LORA['r']} on "
          f"every LM linear + projector, fp32, {torch.get_num_threads()} threads; {args.rounds} alternated runs "
          f"per tool, each {args.warmup} warm-up + {args.steps} timed steps")
    print(f"fp32 matmul peak (torch.mm 4096^2): {peak / 1e9:.0f} GFLOP/s; LM parameters "
          f"{results[tools[0]][0]['lm_params'] / 1e6:.1f}M; 1-min load average after each run "
          f"{min(loads):.1f}-{max(loads):.1f} (the run's own threads count ~2; more means other work shared the CPU)")
    header = (f"{'tool':<9}{'step s':>8}{'samples/s':>11}{'real tok':>10}{'padded':>8}{'superv.':>9}"
              f"{'tok/s':>8}{'RSS MB':>8}{'util':>7}")
    print(header)
    print("-" * len(header))
    for tool, row in rows.items():
        print(f"{tool:<9}{row['step']:>8.3f}{row['samples_s']:>11.2f}{row['real']:>10.1f}{row['padded']:>8.1f}"
              f"{row['supervised']:>9.1f}{row['tokens_s']:>8.0f}{row['rss']:>8.0f}{row['util']:>7.0%}")

    initial = {tool: [run["initial_loss"] for run in runs] for tool, runs in results.items()}
    reference = initial[tools[0]][0]
    spread = max(abs(loss - reference) / reference for losses in initial.values() for loss in losses)
    first = {tool: [run["losses"][0] for run in runs] for tool, runs in results.items()}
    for what, values, digits in (("untrained model's loss on the first 8 samples", initial, 6),
                                 ("first logged training loss", first, 6)):
        print(f"{what}: " + ", ".join(f"{tool} " + " / ".join(f"{x:.{digits}f}" for x in losses)
                                      for tool, losses in values.items()))
    path = max(abs(run["losses"][0] - run["first_batch_loss"]) / run["first_batch_loss"]
               for runs in results.values() for run in runs)
    agree = spread < 1e-4 and path < 1e-4
    print(f"losses {'agree' if agree else 'DISAGREE'}: across tools on the same samples, largest relative "
          f"difference {spread:.1e}; each tool's first logged loss against model(**batch).loss on that batch, "
          f"{path:.1e}")
    if "phiclip" in rows and "plain" in rows:
        print(f"speedup: {rows['phiclip']['samples_s'] / rows['plain']['samples_s']:.2f}x")
    if not agree:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--turns", type=int, default=1, help="question/answer pairs per sample (0: all, as they come)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tools", default="phiclip,plain,trl")
    parser.add_argument("--phiclip-override", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="config override for PhiClip's run (to measure one setting against another)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true",
                        help="16 samples, batch 4, 1 warm-up and 2 timed steps, 1 round, phiclip and plain")
    args = parser.parse_args()
    if args.small:
        args.samples, args.batch, args.warmup, args.steps, args.rounds, args.tools = 16, 4, 1, 2, 1, "phiclip,plain"
    if args.worker is None:
        drive(args)
        return
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        result = WORKERS[args.worker](Path(tmp), args)
    args.result.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
