"""GPU check of both reference stages at their configured batch and ``max_length``, beside the memory model.

A random-weight PhiClip shaped like Phi-3.5-mini-instruct (3.8B, its published config) + CLIP
ViT-L/14-336 (576 image positions), built from configs written in ``benchmarks/reference_shapes.py``
(nothing fetched): the LM's random weights, made on the GPU, are loaded through transformers (and,
for stage 2, its bitsandbytes quantizer with the recipe's own NF4 settings:
``runtime.devices.quantization``). Each stage is then set up as ``configs/reference-stage1.yaml`` /
``reference-stage2.yaml`` say -- stage 1: projector only; stage 2: NF4 QLoRA on every LM linear
(``train.lora.attach_lora``) and the projector -- with gradient checkpointing as configured, bf16,
and trained for a warm-up step and ``--steps`` timed steps through ``PhiClipTrainer`` at the
configured batch, each sample ``max_length`` LM positions (576 image + text, its second half supervised).

Per stage it prints step time, tokens/s, peak GPU memory allocated and reserved, and the memory
model's held and peak figures for the same shapes (``benchmarks/memory_model.py``), then
utilisation = 4 x LM parameters x tokens/s / the bf16 matmul peak measured on this card. About
5 minutes on an H100.

    python benchmarks/gpu_check.py            # a GPU machine
    python benchmarks/gpu_check.py --tiny     # shrunk shapes, float32, on this CPU (make test)
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

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

from benchmarks import memory_model, reference_shapes  # noqa: E402
from configuration_phiclip import PhiClipConfig  # noqa: E402
from data.dataset import Collator  # noqa: E402
from data.template import IGNORE_INDEX  # noqa: E402
from modeling_phiclip import PhiClipForCausalLM, vision_tower_class  # noqa: E402
from runtime.config import LoraConfig, RunConfig, load_config  # noqa: E402
from runtime.devices import quantization  # noqa: E402
from train.checkpointing import enable_activation_checkpointing  # noqa: E402
from train.lora import attach_lora  # noqa: E402
from train.trainer import PhiClipTrainer  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str
    cfg: RunConfig
    lm: dict
    vision: dict
    positions: int  # LM positions per sample, image included
    dtype: torch.dtype

    @property
    def lora(self) -> LoraConfig | None:
        return self.cfg.lora if self.cfg.train.stage == 2 and self.cfg.lora.enabled else None


def stages(tiny: bool) -> list[Stage]:
    """Both reference configs; ``tiny``: the small shapes of ``reference_shapes`` at 64 positions, float32."""
    parts = reference_shapes.parts("small" if tiny else "real")
    out = []
    for name in ("reference-stage1.yaml", "reference-stage2.yaml"):
        cfg = load_config(ROOT / "configs" / name, ["lora.r=8", "lora.alpha=16"] if tiny else [])
        out.append(Stage(name, cfg, parts.lm, parts.vision, 64 if tiny else cfg.data.max_length,
                         torch.float32 if tiny else torch.bfloat16))
    return out


def build(stage: Stage, device: torch.device) -> tuple[PhiClipForCausalLM, int]:
    """The stage's model with random weights, and the LM's parameter count (without the input embedding: a
    lookup, not a matmul)."""
    lm_config = Phi3Config(**{k: v for k, v in stage.lm.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        layout = Phi3ForCausalLM(lm_config)
    n_lm = sum(p.numel() for p in layout.parameters()) - layout.get_input_embeddings().weight.numel()
    state = {name: random_weight(tuple(p.shape), lm_config.initializer_range, stage.dtype, device)
             for name, p in layout.state_dict().items()}
    quant = quantization(stage.lora, stage.dtype) if stage.lora else None
    lm = Phi3ForCausalLM.from_pretrained(None, config=lm_config, state_dict=state, dtype=stage.dtype,
                                         quantization_config=quant, device_map={"": str(device)},
                                         attn_implementation="sdpa")
    del state
    config = PhiClipConfig(
        text_model="random", vision_model="random",
        text_config={k: v for k, v in lm.config.to_dict().items() if k != "quantization_config"},
        vision_config=CLIPVisionConfig(**stage.vision).to_dict(), image_token_id=lm_config.vocab_size - 1,
        vision_feature_layer=stage.cfg.model.vision_feature_layer,
        vision_feature_select_strategy=stage.cfg.model.vision_feature_select_strategy,
    )
    with torch.device(device):
        tower = vision_tower_class(config)(config.vision_config).to(stage.dtype)
    model = PhiClipForCausalLM(config, language_model=lm, vision_tower=tower)
    model.projector.to(device=device, dtype=stage.dtype)
    model.requires_grad_(False)
    if stage.lora:  # as train.run.prepare_model sets a stage up
        attach_lora(model, stage.lora)
    model.projector.requires_grad_(True)
    if stage.cfg.train.gradient_checkpointing:
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
        self.supervised = int((self.labels[0] != IGNORE_INDEX).sum())
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
    stage: str
    batch: int
    positions: int
    n_lm: int
    predicted: memory_model.Memory
    step_s: float = float("nan")
    tokens_s: float = float("nan")
    allocated_gb: float = float("nan")
    reserved_gb: float = float("nan")
    oom: bool = False


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(stage: Stage, steps: int, device: torch.device, out: Path) -> Row:
    """Build the stage's model and train ``1 + steps`` steps at its configured batch (the first warms up);
    running out of memory is a result, not an error."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, n_lm = build(stage, device)
    batch = stage.cfg.train.batch_size
    data = Samples(model, stage.positions, batch * (1 + steps))
    recipe = memory_model.Recipe.from_configs(
        stage.lm, stage.vision, model.image_token_count(), batch=batch, max_length=stage.positions,
        supervised=data.supervised, lora_rank=stage.lora.r if stage.lora else 0,
        quantized=bool(stage.lora and stage.lora.quantize == "nf4"),
        checkpointing=stage.cfg.train.gradient_checkpointing, dtype_bytes=torch.finfo(stage.dtype).bits // 8)
    row = Row(stage.name, batch, stage.positions, n_lm, memory_model.predict(recipe))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=batch, max_steps=1 + steps,
        learning_rate=stage.cfg.train.learning_rate, bf16=stage.dtype == torch.bfloat16,
        use_cpu=device.type == "cpu", save_strategy="no", logging_strategy="no", report_to="none",
        remove_unused_columns=False, disable_tqdm=True,
    )
    timer = StepTimer(device)
    trainer = PhiClipTrainer(model=model, args=args, train_dataset=data, data_collator=Collator(0), callbacks=[timer],
                             projector_lr=stage.cfg.train.projector_learning_rate,
                             loss_only_compute=stage.cfg.train.loss_only_compute)
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        row.oom = True
    finally:
        trainer.optimizer = None
        del trainer, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if row.oom:
        return row
    row.step_s = statistics.median(timer.times[1:])
    row.tokens_s = batch * stage.positions / row.step_s
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
    parser.add_argument("--tiny", action="store_true", help="shrunk shapes, float32 (CPU smoke run)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage, after one warm-up step")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cpu") if args.tiny else torch.device("cuda", 0)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU smoke run")
    todo = stages(args.tiny)
    peak = matmul_peak(device, todo[0].dtype, n=512 if args.tiny else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; {str(todo[0].dtype).removeprefix('torch.')} matmul peak {peak / 1e12:.1f} TFLOP/s "
          f"(measured)")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for stage in todo:
            rows.append(run_stage(stage, args.steps, device, Path(out)))
            print(f"{stage.name}: done after {time.perf_counter() - started:.0f} s", flush=True)

    print(f"\n{'config':<22} {'batch':>5} {'positions':>9} {'step s':>7} {'tokens/s':>9} {'util':>6} "
          f"{'peak alloc GB':>13} {'reserved GB':>11} {'model peak GB':>13} {'model held GB':>13}")
    for row in rows:
        model = f"{row.predicted.peak / 2**30:>13.2f} {row.predicted.held / 2**30:>13.2f}"
        if row.oom:
            print(f"{row.stage:<22} {row.batch:>5} {row.positions:>9} {'out of memory':>47} {model}")
            continue
        util = 4 * row.n_lm * row.tokens_s / peak
        memory = [f"{gb:.2f}" if device.type == "cuda" else "n/a" for gb in (row.allocated_gb, row.reserved_gb)]
        print(f"{row.stage:<22} {row.batch:>5} {row.positions:>9} {row.step_s:>7.3f} {row.tokens_s:>9.0f} "
              f"{util:>6.1%} {memory[0]:>13} {memory[1]:>11} {model}")
    print(f"\nmemory model: {'; '.join(f'{r.stage} predicts {r.predicted.peak / 2**30:.2f} GB peak' for r in rows)}; "
          f"total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
