"""GPU check of the reference recipe's shapes: peak memory at batch 1, throughput at the largest batch.

A random-weight PhiClip shaped like Phi-3.5-mini-instruct (3.8B) + CLIP ViT-L/14-336 (576 patch
tokens), built from configs alone (no download): the LM's random weights, made on the GPU, are
loaded through transformers' bitsandbytes quantizer with the recipe's own NF4 settings
(``runtime.devices.quantization``: ``from_pretrained(None, state_dict=...)``, no temp dir). Then as
stage 2 of the recipe trains it: QLoRA r=128 on every LM linear (``train.lora.attach_lora``),
projector trained, gradient checkpointing, bf16, one step at a time through ``PhiClipTrainer``.
Each sample is 576 image positions + 448 text tokens = 1024 LM positions, the last 224 supervised.

It prints the peak GPU memory at batch 1 (aim: <= 12 GB, a consumer card), then doubles the batch
until it runs out of memory (or time), and prints tokens/s and utilisation = 4 x LM parameters x
tokens/s / the bf16 matmul peak measured on this card (forward + input gradients of the frozen LM;
checkpointing's recomputation is not counted as useful work). Under 5 minutes on an H100.

    python benchmarks/gpu_check.py            # a GPU machine
    python benchmarks/gpu_check.py --tiny     # shrunk shapes, float32, no quantization: a CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, Phi3Config, Phi3ForCausalLM, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from configuration_phiclip import PhiClipConfig  # noqa: E402
from data.dataset import Collator  # noqa: E402
from data.template import IGNORE_INDEX  # noqa: E402
from modeling_phiclip import PhiClipForCausalLM, vision_tower_class  # noqa: E402
from runtime.config import LoraConfig  # noqa: E402
from runtime.devices import quantization  # noqa: E402
from train.checkpointing import enable_activation_checkpointing  # noqa: E402
from train.lora import attach_lora  # noqa: E402
from train.trainer import PhiClipTrainer  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    lm: Phi3Config
    vision: CLIPVisionConfig
    positions: int  # LM positions per sample, image included
    quantize: bool
    dtype: torch.dtype


def reference_shapes() -> Shapes:
    """Phi-3.5-mini-instruct and CLIP ViT-L/14-336 (hidden states of layer -2, CLS dropped: 576 tokens)."""
    lm = Phi3Config(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=131072, original_max_position_embeddings=4096,
        pad_token_id=32000, eos_token_id=32000, tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    return Shapes(lm, vision, positions=1024, quantize=True, dtype=torch.bfloat16)


def tiny_shapes() -> Shapes:
    lm = Phi3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    return Shapes(lm, vision, positions=64, quantize=False, dtype=torch.float32)


def build(shapes: Shapes, device: torch.device) -> tuple[PhiClipForCausalLM, int]:
    """The recipe's stage-2 model with random weights, and the LM's parameter count before quantization
    (without the input embedding: a lookup, not a matmul)."""
    lm_config = shapes.lm
    with torch.device("meta"):
        layout = Phi3ForCausalLM(lm_config)
    n_lm = sum(p.numel() for p in layout.parameters()) - layout.get_input_embeddings().weight.numel()
    state = {name: random_weight(tuple(p.shape), lm_config.initializer_range, shapes.dtype, device)
             for name, p in layout.state_dict().items()}
    lora = LoraConfig(r=128, alpha=256, dropout=0.05, quantize="nf4" if shapes.quantize else "none")
    quant = quantization(lora, shapes.dtype)
    lm = Phi3ForCausalLM.from_pretrained(None, config=lm_config, state_dict=state, dtype=shapes.dtype,
                                         quantization_config=quant, device_map={"": str(device)},
                                         attn_implementation="sdpa")
    del state
    config = PhiClipConfig(
        text_model="random", vision_model="random",
        text_config={k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"},
        vision_config=shapes.vision.to_dict(), image_token_id=lm_config.vocab_size - 1,
    )
    with torch.device(device):
        tower = vision_tower_class(config)(config.vision_config).to(shapes.dtype)
    model = PhiClipForCausalLM(config, language_model=lm, vision_tower=tower)
    model.projector.to(device=device, dtype=shapes.dtype)
    model.requires_grad_(False)
    # stage 2 as train.run.prepare_model sets it up
    attach_lora(model, lora)
    model.projector.requires_grad_(True)
    enable_activation_checkpointing(model)
    return model, n_lm


def random_weight(shape: tuple[int, ...], std: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Normal(0, std) for a matrix, ones for a norm's vector; drawn on ``device`` (fast), handed over on the CPU
    like weights read from a file."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, device=device, dtype=dtype) * std).cpu()


class Samples(torch.utils.data.Dataset):
    """``n`` samples of ``positions`` LM positions: one image, then text whose second half is supervised."""

    def __init__(self, model: PhiClipForCausalLM, positions: int, n: int) -> None:
        config = model.config
        per_image = model.image_token_count()
        n_text = positions - per_image
        if n_text < 4:
            raise ValueError(f"{positions} positions leave no room for text after {per_image} image tokens")
        gen = torch.Generator().manual_seed(0)
        text = torch.randint(2, min(config.text_config.vocab_size - 1, 32000), (n, n_text), generator=gen)
        self.input_ids = torch.cat([torch.full((n, 1), config.image_token_id), text], dim=1)
        self.labels = self.input_ids.clone()
        self.labels[:, : 1 + n_text // 2] = IGNORE_INDEX
        size = config.vision_config.image_size
        self.pixels = torch.randn(3, size, size, generator=gen)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # pixel_values (1, 3, H, W): the sample's one image, as the training dataset gives it
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "pixel_values": self.pixels[None]}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step, the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0.0
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        synchronize(self.device)
        self.times.append(time.perf_counter() - self.start)


@dataclass
class Row:
    batch: int
    step_s: float = float("nan")
    tokens_s: float = float("nan")
    allocated_gb: float = float("nan")
    reserved_gb: float = float("nan")
    oom: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_batch(model: PhiClipForCausalLM, shapes: Shapes, batch: int, steps: int, device: torch.device,
              out: Path) -> Row:
    """``1 + steps`` training steps at ``batch`` (the first one warms up); OOM is a result, not an error."""
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=1 + steps, learning_rate=2e-4,
        bf16=shapes.dtype == torch.bfloat16, use_cpu=device.type == "cpu", save_strategy="no",
        logging_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True,
    )
    timer = StepTimer(device)
    data = Samples(model, shapes.positions, batch * (1 + steps))
    trainer = PhiClipTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(0),
                             callbacks=[timer], projector_lr=2e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = Row(batch)
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        row.oom = True
    finally:
        trainer.optimizer = None
        del trainer
        model.zero_grad(set_to_none=True)
        empty_cache(device)
    if row.oom:
        return row
    row.step_s = statistics.median(timer.times[1:])
    row.tokens_s = batch * shapes.positions / row.step_s
    if device.type == "cuda":
        row.allocated_gb = torch.cuda.max_memory_allocated(device) / 2**30
        row.reserved_gb = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best rate of a square ``torch.mm`` on this device in ``dtype``, FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes, float32, no quantization (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per batch size, after one warm-up step")
    parser.add_argument("--max-batch", type=int, default=None, help="stop the search here (default 64; 2 with --tiny)")
    parser.add_argument("--budget", type=float, default=240, help="seconds after which no larger batch is tried")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    shapes = tiny_shapes() if args.tiny else reference_shapes()
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU smoke run")
    max_batch = args.max_batch or (2 if args.tiny else 64)

    peak = matmul_peak(device, shapes.dtype, n=512 if args.tiny else 8192)
    model, n_lm = build(shapes, device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; {str(shapes.dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"(measured); model built in {time.perf_counter() - started:.0f} s")
    print(f"LM {n_lm / 1e9:.2f}B parameters ({'NF4' if shapes.quantize else 'unquantized'}), "
          f"tower {sum(p.numel() for p in model.vision_tower.parameters()) / 1e9:.2f}B, "
          f"trainable {trainable / 1e6:.1f}M (LoRA r=128 + projector); "
          f"{model.image_token_count()} image tokens, {shapes.positions} positions per sample")

    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as out:
        batch = 1
        while batch <= max_batch:
            rows.append(run_batch(model, shapes, batch, args.steps, device, Path(out)))
            elapsed = time.perf_counter() - started
            last = rows[-1]
            if last.oom or elapsed + 2.5 * (1 + args.steps) * last.step_s > args.budget:
                break
            batch *= 2

    print(f"\n{'batch':>5}  {'step s':>7}  {'tokens/s':>9}  {'peak alloc GB':>13}  {'peak reserved GB':>16}  {'util':>5}")
    for row in rows:
        if row.oom:
            print(f"{row.batch:>5}  {'out of memory':>7}")
            continue
        util = 4 * n_lm * row.tokens_s / peak
        memory = [f"{gb:.2f}" if device.type == "cuda" else "n/a" for gb in (row.allocated_gb, row.reserved_gb)]
        print(f"{row.batch:>5}  {row.step_s:>7.3f}  {row.tokens_s:>9.0f}  {memory[0]:>13}  {memory[1]:>16}  {util:>5.1%}")
    fits = [row for row in rows if not row.oom]
    if not fits:
        print("\nbatch 1 does not fit")
        return rows
    first, best = fits[0], max(fits, key=lambda row: row.tokens_s)
    if device.type == "cuda":
        verdict = "fits" if first.reserved_gb <= 12 else "does NOT fit"
        print(f"\nbatch 1: peak {first.allocated_gb:.2f} GB allocated, {first.reserved_gb:.2f} GB reserved "
              f"(+ CUDA context): {verdict} a 12 GB card")
    print(f"largest batch run: {fits[-1].batch}{' (next one out of memory)' if rows[-1].oom else ''}; "
          f"best {best.tokens_s:.0f} tokens/s at batch {best.batch}, "
          f"utilisation {4 * n_lm * best.tokens_s / peak:.1%} of the measured matmul peak; "
          f"total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
