"""The Hub package under the last transformers 4.x release (4.57) gives the same greedy answers as under 5.x.

One script (``PROBE`` below) is run twice on a copy of the tiny run's Hub folder: with the project's
``.venv`` (transformers 5.x) and with ``.venv-tf4`` (4.57, made by ``scripts/tf4_setup.sh``). Each
run sits in a temporary directory, with no ``PYTHONPATH`` and its own ``HF_HOME``, so the only PhiClip
code it can use is the folder's, through ``trust_remote_code`` (the script asserts that the project's
``*_phiclip`` modules are not importable). Stages are recorded one by one, so one failing stage names
its error without hiding the others:

- ``model_load``: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``;
- ``processor``: ``AutoProcessor``, ``processor(images=..., text=...)`` and the tokenizer's chat template,
  then ``generate(max_new_tokens=8, do_sample=False)`` on an image question and a text-only one;
- ``model``: ``generate()`` on the inputs the 5.x processor made (the same tensors in both runs): the
  modeling and configuration code on their own, whatever the processor does;
- ``pipeline``: ``pipeline("image-text-to-text", trust_remote_code=True)``;
- ``dtype``: ``dtype=`` and the legacy ``torch_dtype=`` reach the base LM.

The tiny CLIP tower is saved by transformers 5, whose ``CLIPVisionModel`` has no ``vision_model.``
level: 4.57 would load that file as a random tower (a warning only), so the copy names the same tower
written in the Hub's checkpoint layout (``vision_model.*`` keys, as in ``openai/clip-vit-*``), which
both versions read to the same weights. Nothing else in the folder is changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.transformers4

ROOT = Path(__file__).resolve().parents[1]
TF4_PYTHON = ROOT / ".venv-tf4" / "bin" / "python"
if not TF4_PYTHON.is_file():
    pytest.skip(f"no transformers 4.57 side environment ({TF4_PYTHON} missing; run scripts/tf4_setup.sh)",
                allow_module_level=True)

PROBE = r'''
import importlib, importlib.util, json, sys, traceback
from pathlib import Path

# The project's editable install (the .venv) maps its top-level modules with a meta-path finder:
# drop it, so that only the Hub folder's copy of the code can be used.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
importlib.invalidate_caches()
for name in ("configuration_phiclip", "modeling_phiclip", "processing_phiclip"):
    spec = importlib.util.find_spec(name)
    assert spec is None, f"{name} is importable from {spec.origin}: the test would not exercise remote code"

folder, out, given = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
import torch, transformers
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

report = {"transformers": transformers.__version__, "torch": torch.__version__, "errors": {}}
QUESTION, CHAT = "Is it bright?", [{"role": "user", "content": "What is a cat?"}]
image = Image.new("RGB", (32, 32), (240, 200, 40))
tensors = {}

def stage(name):
    def run(fn):
        try:
            fn()
        except Exception as err:
            traceback.print_exc()
            report["errors"][name] = f"{type(err).__name__}: {err}"
    return run

def answer(model, inputs, tag):
    with torch.no_grad():
        tensors[f"logits_{tag}"] = model(**inputs).logits[0, -1].float()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"]), "generate() must return the prompt"
    return out[0, inputs["input_ids"].shape[1]:].tolist()

model = None

@stage("model_load")
def _():
    global model
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    report["adapter"] = bool(model.has_adapter)

@stage("processor")
def _():
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor_class"] = f"{type(processor).__module__}.{type(processor).__name__}"
    enc = processor(images=image, text=QUESTION, return_tensors="pt")
    report["image_input_keys"] = sorted(enc.keys())
    chat = processor.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    report["chat_template_returns"] = type(chat).__name__  # 4.57: a tensor; 5.x: a BatchEncoding
    ids = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]
    inputs = {"image": {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")},
              "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    tensors["inputs"] = inputs
    report["image_prompt_ids"] = inputs["image"]["input_ids"][0].tolist()
    report["text_prompt_ids"] = ids[0].tolist()
    report["image_ids"] = answer(model, inputs["image"], "image")
    report["text_ids"] = answer(model, inputs["text"], "text")
    report["image_text"] = processor.decode(report["image_ids"], skip_special_tokens=True)

@stage("model")
def _():
    # The 5.x processor's inputs (this run's own when none are given): the model code alone, same inputs in both.
    inputs = torch.load(given) if given.is_file() else tensors["inputs"]
    report["model_image_ids"] = answer(model, inputs["image"], "model_image")
    report["model_text_ids"] = answer(model, inputs["text"], "model_text")

@stage("pipeline")
def _():
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    result = pipe(images=image, text=QUESTION, return_full_text=False,
                  generate_kwargs={"max_new_tokens": 8, "do_sample": False})
    report["pipeline_text"] = result[0]["generated_text"]

@stage("dtype")
def _():
    for key in ("dtype", "torch_dtype"):
        m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **{key: torch.bfloat16})
        # the LoRA weights stay float32 (PEFT's autocast_adapter_dtype): the base LM, tower and projector are bf16
        parts = (m.get_input_embeddings(), m.vision_tower, m.projector)
        report[f"{key}_bf16"] = sorted({str(next(part.parameters()).dtype) for part in parts})

torch.save(tensors, out / "tensors.pt")
print("RESULT " + json.dumps(report))
'''


def _hub_layout_tower(tower: Path, out: Path) -> Path:
    """The tower's files with its weights under ``vision_model.``, as Hub CLIP checkpoints store them."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for item in tower.iterdir():
        if item.name != "model.safetensors":
            shutil.copy(item, out / item.name)
    state = load_file(str(tower / "model.safetensors"))
    state = {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in state.items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _run(python: Path, folder: Path, work: Path, given: Path) -> tuple[dict, dict]:
    work.mkdir(parents=True)
    script = work / "probe.py"
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "HF_MODULES_CACHE")}
    env.update(HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(python), str(script), str(folder), str(work), str(given)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"{python} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    report = json.loads(lines[-1][len("RESULT "):])
    report["stderr"] = proc.stderr
    return report, torch.load(work / "tensors.pt")


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """The probe's report and tensors under transformers 5 (``"tf5"``) and 4.57 (``"tf4"``)."""
    root = tmp_path_factory.mktemp("tf4")
    folder = shutil.copytree(tiny_run / "model", root / "phiclip")
    config = json.loads((folder / "config.json").read_text())
    config["vision_model"] = str(_hub_layout_tower(Path(config["vision_model"]), root / "tower"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    given = root / "inputs.pt"  # written after the 5.x run: the inputs its processor made
    tf5 = _run(Path(sys.executable), folder, root / "tf5", given)
    assert not tf5[0]["errors"], f"transformers 5 run failed: {tf5[0]['errors']}\n{tf5[0]['stderr'][-6000:]}"
    torch.save(tf5[1]["inputs"], given)
    tf4 = _run(TF4_PYTHON, folder, root / "tf4", given)
    return {"tf5": tf5, "tf4": tf4}


def _no_error(report: dict, stage: str) -> None:
    error = report["errors"].get(stage)
    assert error is None, f"transformers {report['transformers']}, stage '{stage}': {error}"


def test_versions(runs):
    assert runs["tf5"][0]["transformers"].startswith("5.")
    assert runs["tf4"][0]["transformers"].startswith("4.57.")
    assert runs["tf4"][0]["torch"] == runs["tf5"][0]["torch"]
    for report, _ in runs.values():
        # the remote-code copy of the class, from the folder (transformers_modules), not the project's module
        assert report["model_class"].startswith("transformers_modules.")
        assert report["model_class"].endswith("modeling_phiclip.PhiClipForCausalLM")
        assert report["adapter"] is True


def test_model_code_same_greedy_ids(runs):
    """AutoModelForCausalLM + generate() on the same inputs (the 5.x processor's): same ids, same logits."""
    (tf5, t5), (tf4, t4) = runs["tf5"], runs["tf4"]
    _no_error(tf4, "model_load")
    _no_error(tf4, "model")
    assert tf4["model_image_ids"] == tf5["model_image_ids"]
    assert tf4["model_text_ids"] == tf5["model_text_ids"]
    for tag in ("model_image", "model_text"):
        torch.testing.assert_close(t4[f"logits_{tag}"], t5[f"logits_{tag}"], atol=1e-4, rtol=1e-4)
    # the image reaches the answer: its logits are not the text question's
    assert not torch.allclose(t5["logits_model_image"], t5["logits_model_text"])


def test_processor_same_inputs_and_greedy_ids(runs):
    """AutoProcessor: the same prompt ids and pixels, then the same greedy ids, for both questions."""
    (tf5, t5), (tf4, t4) = runs["tf5"], runs["tf4"]
    _no_error(tf4, "processor")
    assert tf4["image_input_keys"] == tf5["image_input_keys"] == ["attention_mask", "input_ids", "pixel_values"]
    assert tf4["image_prompt_ids"] == tf5["image_prompt_ids"]
    assert tf4["text_prompt_ids"] == tf5["text_prompt_ids"]
    torch.testing.assert_close(t4["inputs"]["image"]["pixel_values"], t5["inputs"]["image"]["pixel_values"],
                               atol=1e-5, rtol=1e-5)
    assert tf4["image_ids"] == tf5["image_ids"]
    assert tf4["text_ids"] == tf5["text_ids"]
    for tag in ("image", "text"):
        torch.testing.assert_close(t4[f"logits_{tag}"], t5[f"logits_{tag}"], atol=1e-4, rtol=1e-4)


def test_pipeline_same_answer(runs):
    tf5, tf4 = runs["tf5"][0], runs["tf4"][0]
    _no_error(tf4, "pipeline")
    assert tf4["pipeline_text"] == tf5["pipeline_text"] == tf5["image_text"]


def test_dtype_arguments(runs):
    for report, _ in runs.values():
        _no_error(report, "dtype")
        assert report["dtype_bf16"] == report["torch_dtype_bf16"] == ["torch.bfloat16"]
