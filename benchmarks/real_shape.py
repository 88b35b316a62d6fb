"""The reference recipe at its real shape, end to end on this machine, through the project's own code paths.

A random-weight Phi-3.5-mini-instruct (3.8B, its published config) with a tokenizer of its
vocabulary size, special tokens and chat template, and a random-weight CLIP ViT-L/14-336
(``benchmarks/reference_shapes.py``), put together as ``configs/reference-stage2.yaml`` says:
layer -2 without the class token (576 image positions), NF4 QLoRA r=128 on every LM linear,
gradient checkpointing, ``max_length`` 2048. Each stage runs in its own process (its peak RSS is
its own) and leaves ``WORK/results/STAGE.json``; a stage already done is not run again.

* ``build``: the LM, tower and tokenizer folders, a 336-px photo and two LLaVA records whose long
  answers fill ``max_length``;
* ``train``: ``train.run.train`` on the reference config (batch 1, two steps): losses, gradients
  reaching the projector and LoRA, step times, and the memory model (``benchmarks/memory_model.py``)
  against the bytes the run holds: weights by part, gradients, AdamW states, saved activations
  (whole model, checkpointed; and one decoder layer without checkpointing);
* ``hub``: the run's ``model/`` through the Hub files in a fresh process (``AutoModelForCausalLM`` /
  ``AutoProcessor`` with ``trust_remote_code``), 8 greedy tokens, first-step logits kept;
* ``llava``: ``phiclip export`` (merged, the LM's own dtype), the export's first-step logits on the
  same picture and question against PhiClip's;
* ``vllm_lora``: ``phiclip export --format vllm-lora``; every adapter tensor's name and shape is one
  vLLM's Phi-3 maps (fused ``qkv_proj`` / ``gate_up_proj``);
* ``gguf``: ``phiclip export --format gguf --quant q4_k_m`` (llama.cpp's converter and quantizer,
  ``.venv-llama``): refused as configured (CLIP's class token), then with ``allow_approximate_vision``.

It ends with a table of every stage (seconds, peak RSS), the files written with their sizes, the
memory table and the closing line ``real shape: ... stages done``.

    python benchmarks/real_shape.py --work /tmp/phiclip-real-shape   # the real shape (about 25 minutes here)
    python benchmarks/real_shape.py --small                          # the same stages at toy sizes (make test)

The stages themselves are in ``benchmarks/real_shape_stages.py``; this script runs them and reports.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the project's root first; not this folder, whose gguf.py would hide the gguf package the export uses
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

from benchmarks import memory_model, real_shape_stages, reference_shapes  # noqa: E402
from benchmarks.real_shape_stages import peak_rss_gb, run_config  # noqa: E402

STAGES = ("build", "train", "hub", "llava", "vllm_lora", "gguf")


def memory_rows(work: Path, shape: str) -> list[tuple[str, float, float | None]]:
    """(part, predicted bytes, measured bytes or None) for the CPU run (float32, batch 1, checkpointing)."""
    cfg = run_config(work, shape)
    build = json.loads((work / "results" / "build.json").read_text())
    train = json.loads((work / "results" / "train.json").read_text())
    lm = json.loads((work / "lm" / "config.json").read_text())
    vision = reference_shapes.parts(shape).vision
    recipe = memory_model.Recipe.from_configs(
        lm, vision, build["image_tokens"], batch=1, max_length=max(build["positions"]),
        supervised=max(build["supervised"]), lora_rank=cfg.lora.r, quantized=True, checkpointing=True, dtype_bytes=4)
    predicted = memory_model.predict(recipe)
    m = train["measured"]
    lora = m.get("LoRA", 0) + m["gradients"] + m["AdamW states"]
    projector_measured = m.get("projector", 0)
    saved_predicted = sum(v for k, v in predicted.parts.items() if k.startswith("activations"))
    rows = [
        ("LM linears (NF4)", predicted.parts["LM linears"], m.get("LM linears")),
        ("LM embeddings, head, norms", predicted.parts["LM embeddings, head, norms"],
         m.get("LM embeddings, head, norms")),
        ("vision tower", predicted.parts["vision tower"], m.get("vision tower")),
        ("projector (weights only)", predicted.parts["projector + grads + AdamW"] / 4, projector_measured),
        ("LoRA + projector: weights, grads, AdamW", predicted.parts["LoRA + grads + AdamW (fp32)"]
         + predicted.parts["projector + grads + AdamW"], lora + projector_measured),
        ("saved activations, checkpointed forward", saved_predicted,
         m["saved activations (checkpointed forward)"]),
        ("one layer recomputed (no checkpointing)", memory_model.layer_saved(recipe, cfg.data.max_length),
         m["saved activations (one layer, no checkpointing)"]),
        ("logits gradient (transient, not measured)", predicted.transient["logits gradient"], None),
    ]
    return rows


def plan_rows(shape: str) -> list[tuple[str, memory_model.Memory]]:
    """The memory model for each reference config on a GPU (bfloat16) at its batch and ``max_length``."""
    from runtime.config import load_config

    parts = reference_shapes.parts(shape)
    image = (parts.vision["image_size"] // parts.vision["patch_size"]) ** 2
    out = []
    for name in ("reference-stage1.yaml", "reference-stage2.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        stage2 = cfg.train.stage == 2 and cfg.lora.enabled
        length = cfg.data.max_length if shape == "real" else 256
        recipe = memory_model.Recipe.from_configs(
            parts.lm, parts.vision, image, batch=cfg.train.batch_size, max_length=length, supervised=length - image,
            lora_rank=cfg.lora.r if stage2 else 0, quantized=stage2 and cfg.lora.quantize == "nf4",
            checkpointing=cfg.train.gradient_checkpointing, dtype_bytes=2)
        out.append((f"{name} (batch {cfg.train.batch_size}, {length} positions)", memory_model.predict(recipe)))
    return out


def report(work: Path, shape: str, done: list[str], asked: list[str]) -> None:
    results = {s: json.loads((work / "results" / f"{s}.json").read_text()) for s in done}
    print(f"\n{'stage':<10} {'seconds':>8} {'peak RSS GB':>12}")
    for s, r in results.items():
        print(f"{s:<10} {r['seconds_total']:>8.0f} {r['peak_rss_gb']:>12.2f}")
    if "train" in results:
        t = results["train"]
        print(f"\ntraining: losses {', '.join(f'{x:.4f}' for x in t['losses'])}; seconds per step "
              f"{', '.join(f'{x:.0f}' for x in t['step_seconds'])}; records kept {t['records_kept']}/"
              f"{t['records_read']}; gradient norms LoRA {t['grad_norms'].get('LoRA', 0):.3g}, projector "
              f"{t['grad_norms'].get('projector', 0):.3g}; trainable LoRA {t['trainable']['LoRA'] / 1e6:.1f}M, "
              f"projector {t['trainable']['projector'] / 1e6:.2f}M")
        print(f"\n{'memory (CPU run, float32, batch 1)':<46} {'model MiB':>10} {'measured MiB':>13} {'ratio':>6}")
        for name, pred, meas in memory_rows(work, shape):
            measured = f"{meas / 2**20:>13.1f}" if meas is not None else f"{'-':>13}"
            ratio = f"{meas / pred:>6.2f}" if meas else f"{'':>6}"
            print(f"{name:<46} {pred / 2**20:>10.1f} {measured} {ratio}")
    print(f"\n{'memory model, GPU (bfloat16)':<52} {'held GB':>8} {'peak GB':>8}")
    for name, memory in plan_rows(shape):
        print(f"{name:<52} {memory.held / memory_model.GB:>8.2f} {memory.peak / memory_model.GB:>8.2f}")
        for part, value in {**memory.parts, **memory.transient}.items():
            print(f"    {part:<48} {value / memory_model.GB:>8.2f}")
    if "hub" in results:
        h = results["hub"]
        print(f"\nHub files ({h['class']}): loaded in {h['load_seconds']:.0f} s, first step "
              f"{h['first_step_seconds']:.1f} s ({h['prompt_ids']} ids), 8 tokens in {h['generate_8_seconds']:.1f} s: "
              f"{h['new_tokens']}")
    if "llava" in results:
        r = results["llava"]
        print(f"Llava export ({r['dtype']}): first-step logits on PhiClip's ids, max |diff| "
              f"{r['max_abs_logit_diff_same_ids']:.4g} (logit std {r['logit_std']:.3g}; the adapter moves them by up "
              f"to {r['adapter_effect_max_abs']:.3g}), same argmax: {r['same_argmax']}; LlavaProcessor's own ids "
              f"{'equal' if r['same_prompt_ids'] else 'DIFFER from'} PhiClip's (max |diff| on them "
              f"{r['max_abs_logit_diff_own_processor']:.4g}); exported in float32: max |diff| "
              f"{r['float32']['max_abs_logit_diff_same_ids']:.4g}, same argmax: {r['float32']['same_argmax']}")
    if "vllm_lora" in results:
        r = results["vllm_lora"]
        print(f"vllm-lora export: {r['adapter_tensors']}/{r['expected']} adapter tensors under names vLLM's Phi-3 "
              f"maps; unmapped {len(r['unmapped'])}, wrong shape {len(r['wrong_shape'])}")
    if "gguf" in results:
        r = results["gguf"]
        print(f"GGUF: refused as configured ({'nothing written' if r['nothing_written_on_refusal'] else 'WROTE FILES'})"
              f": {(r['refusal'] or 'NOT REFUSED')[:160]}...\n      with --allow-approximate-vision: vision cosine "
              f"min {r['vision_cosine_min']}")
    print(f"\n{'files written':<60} {'MB':>10}")
    for s, r in results.items():
        for name, size in (r.get("files") or {}).items():
            print(f"{s + ': ' + name:<60} {size / 2**20:>10.3f}")
    print(f"\nreal shape ({shape}): {len(done)}/{len(asked)} stages done")


def run_stage(stage: str, work: Path, shape: str) -> dict:
    start = time.perf_counter()
    result = getattr(real_shape_stages, f"stage_{stage}")(work, shape)
    result["seconds_total"] = time.perf_counter() - start
    result["peak_rss_gb"] = peak_rss_gb()
    if stage == "train" and not all(math.isfinite(x) for x in result["losses"]):
        raise RuntimeError(f"training losses are not finite: {result['losses']}")
    (work / "results").mkdir(exist_ok=True)
    (work / "results" / f"{stage}.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="folder for the parts, run and exports (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="toy sizes: every stage in seconds")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, in this process (the parent runs each so)
    args = parser.parse_args(argv)
    shape = "small" if args.small else "real"
    if args.stage:
        run_stage(args.stage, args.work, shape)
        return 0
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: {', '.join(unknown)} not one of {', '.join(STAGES)}")
    with tempfile.TemporaryDirectory(prefix="phiclip-real-shape-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        done = []
        for stage in stages:
            if not (work / "results" / f"{stage}.json").is_file():
                print(f"--- {stage}", flush=True)
                command = [sys.executable, __file__, "--stage", stage, "--work", str(work)] + (
                    ["--small"] if args.small else [])
                if subprocess.run(command).returncode:
                    print(f"stage {stage} failed (see above); the stages after it were not run", flush=True)
                    break
            done.append(stage)
        report(work, shape, done, stages)
        return 0 if len(done) == len(stages) else 1


if __name__ == "__main__":
    sys.exit(main())
