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

    python benchmarks/real_shape.py --work /tmp/phiclip-real-shape   # the real shape (about an hour here)
    python benchmarks/real_shape.py --small                          # the same stages at toy sizes (make test)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
# the project's root first; not this folder, whose gguf.py would hide the gguf package the export uses
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

from benchmarks import memory_model, reference_shapes  # noqa: E402

STAGES = ("build", "train", "hub", "llava", "vllm_lora", "gguf")
REFERENCE = ROOT / "configs" / "reference-stage2.yaml"
QUESTION = "Describe this picture in detail."
# vLLM's Phi-3 (vllm/model_executor/models/phi3.py, packed_modules_mapping): the LoRA modules it maps.
VLLM_PHI3_LORA = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sizes(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size in bytes (relative names)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run_config(work: Path, shape: str, overrides: list[str] = ()):
    """``configs/reference-stage2.yaml`` pointed at the random-weight parts: batch 1, two steps, nothing else
    changed (the small shape also takes a small LoRA rank and ``max_length``)."""
    from runtime.config import load_config

    changes = [f"model.lm={work / 'lm'}", f"model.vision={work / 'vision'}", f"data.train={work / 'train.json'}",
               f"data.images={work / 'images'}", "data.val_fraction=0", f"train.output_dir={work / 'run'}",
               "train.continue_from=''", "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2",
               "train.dataloader_workers=0", "train.logging_steps=1", "train.warmup_ratio=0"]
    if shape == "small":
        changes += ["lora.r=8", "lora.alpha=16", "data.max_length=256"]
    return load_config(REFERENCE, changes + list(overrides))


# ---------------------------------------------------------------------------------------------------- stages


def stage_build(work: Path, shape: str) -> dict:
    """Random-weight folders, the photo and two records whose answers fill ``max_length``."""
    import pydoc_data.topics

    from PIL import Image
    from skimage import data as photos
    from transformers import AutoImageProcessor, AutoTokenizer

    from data.records import Turn
    from data.template import encode_conversation
    from processing_phiclip import IMAGE_TOKEN, PhiClipProcessor

    parts = reference_shapes.parts(shape)
    reference_shapes.write_lm(parts, work / "lm")
    reference_shapes.write_tower(parts, work / "vision")
    (work / "images").mkdir(exist_ok=True)
    Image.fromarray(photos.astronaut()).resize((336, 336), Image.BICUBIC).save(work / "images" / "photo.jpg")

    cfg = run_config(work, shape)
    processor = PhiClipProcessor.from_parts(AutoImageProcessor.from_pretrained(work / "vision"),
                                            AutoTokenizer.from_pretrained(work / "lm"), None, IMAGE_TOKEN, "pad")
    n_image = (parts.vision["image_size"] // parts.vision["patch_size"]) ** 2  # strategy default: no class token
    words = " ".join(pydoc_data.topics.topics.values()).split()

    def encoded(n_words: int, start: int):
        turns = [Turn("user", f"{IMAGE_TOKEN}\n{QUESTION}"), Turn("assistant", " ".join(words[start:start + n_words]))]
        return encode_conversation(processor, turns, n_image_tokens=n_image, max_length=10**9)

    records, supervised = [], []
    for k in range(2):
        start = 50_000 * k
        lo, hi = 1, cfg.data.max_length
        while lo < hi:  # the most words whose conversation still fits max_length (8 positions to spare)
            mid = (lo + hi + 1) // 2
            fits = len(encoded(mid, start).input_ids) - 1 + n_image <= cfg.data.max_length - 8
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        enc = encoded(lo, start)
        supervised.append(sum(label != -100 for label in enc.labels))
        records.append({"id": f"long-{k}", "image": "photo.jpg", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"},
            {"from": "gpt", "value": " ".join(words[start:start + lo])}],
            "positions": len(enc.input_ids) - 1 + n_image})
    (work / "train.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "positions"} for r in records]))
    return {"positions": [r["positions"] for r in records], "supervised": supervised, "image_tokens": n_image,
            "files": {name: sum(sizes(work / name).values()) for name in ("lm", "vision")}}


class Probe(TrainerCallback):
    """Step times, and on the first step the bytes the run holds (weights by part, saved activations of the
    forward pass, gradients before the optimizer steps, AdamW states after); at the end, one decoder layer's
    saved activations without checkpointing over ``max_length`` positions."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.layer_saved = 0
        self.times: list[float] = []
        self.start = 0.0
        self.static: dict[str, int] = {}
        self.saved: memory_model.SavedTensors | None = None
        self.grads = 0
        self.states = 0
        self.grad_norms: dict[str, float] = {}
        self.trainable: dict[str, int] = {}
        self._handles: list = []

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self.static = memory_model.measure_static(model)
        trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = {"LoRA": sum(k for n, k in trainable if "lora_" in n),
                          "projector": sum(k for n, k in trainable if n.startswith("projector.")),
                          "all": sum(k for _, k in trainable)}
        self.saved = memory_model.SavedTensors(model, decoder_layers(model))
        self._handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                         model.register_forward_hook(self._leave, with_kwargs=True)]

    def _enter(self, module, args, kwargs) -> None:  # the first forward pass only
        self.saved.__enter__()

    def _leave(self, module, args, kwargs, output):
        self.saved.__exit__(None, None, None)
        for handle in self._handles:
            handle.remove()
        return output

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step == 0:
            self.grads, _ = memory_model.trainable_state_bytes(model, None)
            for part, key in (("LoRA", "lora_"), ("projector", "projector.")):
                grads = [p.grad.float().norm() for n, p in model.named_parameters() if key in n and p.grad is not None]
                self.grad_norms[part] = float(torch.stack(grads).norm()) if grads else 0.0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        self.times.append(time.perf_counter() - self.start)
        if len(self.times) == 1:
            _, self.states = memory_model.trainable_state_bytes(model, optimizer)

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self.layer_saved = one_layer_saved(model, self.max_length)


def _lm(model):
    return model.language_model.get_base_model() if hasattr(model.language_model, "get_base_model") else \
        model.language_model


def decoder_layers(model) -> list[torch.nn.Module]:
    return list(_lm(model).model.layers)


def one_layer_saved(model, tokens: int) -> int:
    """Bytes autograd saves for the LM's first decoder layer over ``tokens`` positions, without checkpointing."""
    lm = _lm(model)
    layer = lm.model.layers[0]
    dtype = next(model.projector.parameters()).dtype
    hidden = torch.randn(1, tokens, lm.config.hidden_size, dtype=dtype, requires_grad=True)
    positions = torch.arange(tokens)[None]
    rope = lm.model.rotary_emb(hidden, positions)
    layer.train()
    checkpointed = getattr(layer, "gradient_checkpointing", False)
    layer.gradient_checkpointing = False  # transformers' GradientCheckpointingLayer would save its inputs only
    try:
        with memory_model.SavedTensors(model) as saved:
            out = layer(hidden, position_embeddings=rope, position_ids=positions)
    finally:
        layer.gradient_checkpointing = checkpointed
    del out
    return saved.total


def stage_train(work: Path, shape: str) -> dict:
    from train.run import train

    cfg = run_config(work, shape)
    shutil.rmtree(cfg.train.output_dir, ignore_errors=True)  # a stage run again starts afresh
    probe = Probe(cfg.data.max_length)
    out = train(cfg, callbacks=[probe])
    history = json.loads((out / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    report = json.loads((out / "data_report.json").read_text())
    built = json.loads((work / "results" / "build.json").read_text())
    return {"losses": losses, "step_seconds": probe.times, "records_kept": report["n_kept"],
            "records_read": report["n_read"], "grad_norms": probe.grad_norms, "trainable": probe.trainable,
            "measured": {**probe.static, "gradients": probe.grads, "AdamW states": probe.states,
                         "saved activations (checkpointed forward)": probe.saved.total,
                         "saved activations (one layer, no checkpointing)": probe.layer_saved},
            "supervised": built["supervised"], "files": sizes(out / "model")}


def stage_hub(work: Path, shape: str) -> dict:
    """The Hub files in this fresh process: auto classes with remote code, float32 (the CPU's dtype)."""
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    folder = work / "run" / "model"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    loaded = time.perf_counter() - start
    image = Image.open(work / "images" / "photo.jpg")
    inputs = processor(images=image, text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        start = time.perf_counter()
        logits = model(**inputs).logits[0, -1].float()
        forward = time.perf_counter() - start
        with model.adapter_disabled():
            base = model(**inputs).logits[0, -1].float()
        start = time.perf_counter()
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        generate = time.perf_counter() - start
    torch.save({"phiclip": logits, "base": base, "input_ids": inputs["input_ids"][0].tolist(),
                "image_token_id": model.config.image_token_id, "image_tokens": model.image_token_count()},
               work / "results" / "logits.pt")
    new = ids[0, inputs["input_ids"].shape[1]:].tolist()
    return {"load_seconds": loaded, "first_step_seconds": forward, "generate_8_seconds": generate,
            "new_tokens": new, "text": processor.batch_decode([new])[0], "prompt_ids": inputs["input_ids"].shape[1],
            "class": type(model).__name__}


def stage_llava(work: Path, shape: str) -> dict:
    """The export in the LM's own dtype (``auto``: bf16, as Phi-3.5-mini is published) and, to tell that
    rounding from the merge, in float32."""
    from export.checkpoint import export_run

    start = time.perf_counter()
    out = export_run(work / "run", work / "llava", overwrite=True)
    exported = time.perf_counter() - start
    result = {"export_seconds": exported, **_llava_logits(work, out)}
    full = export_run(work / "run", work / "llava-float32", dtype="float32", overwrite=True)
    result["float32"] = {k: v for k, v in _llava_logits(work, full).items() if k != "files"}
    shutil.rmtree(full)
    return result


def _llava_logits(work: Path, out: Path) -> dict:
    """The Llava export's first-step logits on PhiClip's ids and on its own processor's, against PhiClip's."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    info = json.loads((out / "phiclip_export.json").read_text())
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(work / "images" / "photo.jpg"), text=prompt, return_tensors="pt")
    ours = torch.load(work / "results" / "logits.pt")
    image_id = model.config.image_token_id
    same = [image_id if i == ours["image_token_id"] else i for i in ours["input_ids"]]
    same = torch.tensor([[t for i in same for t in ([i] * ours["image_tokens"] if i == image_id else [i])]])
    with torch.no_grad():
        theirs = model(**inputs).logits[0, -1].float()
        on_same = model(input_ids=same, pixel_values=inputs["pixel_values"]).logits[0, -1].float()
    adapter = (ours["phiclip"] - ours["base"]).abs().max().item()
    return {"dtype": info["dtype"], "files": sizes(out),
            "same_prompt_ids": same[0].tolist() == inputs["input_ids"][0].tolist(),
            "max_abs_logit_diff_same_ids": (on_same - ours["phiclip"]).abs().max().item(),
            "max_abs_logit_diff_own_processor": (theirs - ours["phiclip"]).abs().max().item(),
            "adapter_effect_max_abs": adapter, "logit_std": ours["phiclip"].std().item(),
            "same_argmax": int(on_same.argmax()) == int(ours["phiclip"].argmax())}


def stage_vllm_lora(work: Path, shape: str) -> dict:
    import re

    from safetensors import safe_open

    from export.vllm_lora import export_vllm_lora

    start = time.perf_counter()
    out = export_vllm_lora(work / "run", work / "vllm-lora", overwrite=True)
    seconds = time.perf_counter() - start
    lm = json.loads((work / "lm" / "config.json").read_text())
    h, i, layers = lm["hidden_size"], lm["intermediate_size"], lm["num_hidden_layers"]
    dims = {"self_attn.qkv_proj": (h, 3 * h), "self_attn.o_proj": (h, h), "mlp.gate_up_proj": (h, 2 * i),
            "mlp.down_proj": (i, h)}
    pattern = re.compile(r"base_model\.model\.model\.language_model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight")
    unmapped, wrong_shape, found = [], [], set()
    with safe_open(str(out / "lora" / "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
            match = pattern.fullmatch(key)
            if not match or match[2] not in VLLM_PHI3_LORA or int(match[1]) >= layers:
                unmapped.append(key)
                continue
            n_in, n_out = dims[match[2]]
            shape_ = tuple(f.get_slice(key).get_shape())
            rank = shape_[0] if match[3] == "A" else shape_[1]
            if shape_ != ((rank, n_in) if match[3] == "A" else (n_out, rank)):
                wrong_shape.append(f"{key} {shape_}")
            found.add((int(match[1]), match[2], match[3]))
    expected = layers * len(VLLM_PHI3_LORA) * 2
    return {"seconds": seconds, "files": sizes(out), "adapter_tensors": len(found), "expected": expected,
            "unmapped": unmapped, "wrong_shape": wrong_shape}


def stage_gguf(work: Path, shape: str) -> dict:
    from export.gguf import export_gguf
    from export.mmproj import GGUFExportError

    refusal = None
    try:
        export_gguf(work / "run", work / "gguf-refused", quants=["q4_k_m"], text_route=False)
    except GGUFExportError as err:
        refusal = str(err)
    nothing_written = not (work / "gguf-refused").exists()
    start = time.perf_counter()
    out = export_gguf(work / "run", work / "gguf", quants=["q4_k_m"], name="real-shape", text_route=False,
                      overwrite=True, allow_approximate_vision=True)
    info = json.loads((out / "phiclip_gguf.json").read_text())
    return {"refusal": refusal, "nothing_written_on_refusal": nothing_written,
            "seconds": time.perf_counter() - start, "files": sizes(out),
            "vision_cosine_min": info["vision_cosine_min"], "vision": info["vision"]}


# ---------------------------------------------------------------------------------------------------- report


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
    lora = m.get("LoRA", 0) + m["gradients"] - 0 + m["AdamW states"]
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
    result = globals()[f"stage_{stage}"](work, shape)
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
