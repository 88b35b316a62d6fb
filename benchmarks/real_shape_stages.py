"""The stages of ``benchmarks/real_shape.py``: each builds, trains or exports through the project's own code and
returns what it measured (``WORK/results/STAGE.json``). See that script for what each stage does."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks import memory_model, reference_shapes

ROOT = Path(__file__).resolve().parent.parent
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


def stage_build(work: Path, shape: str) -> dict:
    """Random-weight folders, the photo and two records whose answers fill ``max_length``."""
    import pydoc_data.topics

    from PIL import Image
    from skimage import data as photos
    from transformers import AutoImageProcessor, AutoTokenizer

    from data.records import Turn
    from data.template import IGNORE_INDEX, encode_conversation
    from modeling_phiclip import PhiClipForCausalLM
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

    def encoded(answer: str) -> tuple[int, int]:
        """LM positions (the image as its features) and supervised tokens of the record with ``answer``."""
        turns = [Turn("user", f"{IMAGE_TOKEN}\n{QUESTION}"), Turn("assistant", answer)]
        enc = encode_conversation(processor, turns, n_image_tokens=n_image, max_length=10**9)
        positions = PhiClipForCausalLM.spliced_length(len(enc.input_ids), 1, n_image)
        return positions, sum(label != IGNORE_INDEX for label in enc.labels)

    records, positions, supervised = [], [], []
    for k in range(2):
        start = 50_000 * k
        lo, hi = 1, cfg.data.max_length
        while lo < hi:  # the most words whose conversation still fits max_length (8 positions to spare)
            mid = (lo + hi + 1) // 2
            fits = encoded(" ".join(words[start:start + mid]))[0] <= cfg.data.max_length - 8
            lo, hi = (mid, hi) if fits else (lo, mid - 1)
        answer = " ".join(words[start:start + lo])
        n_positions, n_supervised = encoded(answer)
        positions.append(n_positions)
        supervised.append(n_supervised)
        records.append({"id": f"long-{k}", "image": "photo.jpg", "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": answer}]})
    (work / "train.json").write_text(json.dumps(records))
    return {"positions": positions, "supervised": supervised, "image_tokens": n_image,
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
    return model.language_model.get_base_model() if model.has_adapter else model.language_model


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
