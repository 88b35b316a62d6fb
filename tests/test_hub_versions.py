"""The Hub package under the transformers its users have: the oldest supported, the locked and the newest release.

One script (``PROBE`` below) runs a Hub user's steps on a copy of the tiny run's Hub folder, once per lane:

- ``oldest``: ``.venv-tf4``, the last 4.x release (4.57, ``scripts/tf4_setup.sh``);
- ``locked``: the project's ``.venv``, installed from ``requirements/main.lock``;
- ``newest``: ``.venv-newest``, the newest transformers and peft on the package index, resolved again
  on every ``make test`` (``scripts/newest_setup.sh``), so a release that breaks PhiClip fails by name.

Each run sits in a temporary directory, with no ``PYTHONPATH`` and its own ``HF_HOME``, so the only
PhiClip code it can use is the folder's (or the test Hub repository's), through ``trust_remote_code``
(the script asserts that the project's modules are not importable). Stages are recorded one by one,
so one failing stage names its error without hiding the others:

- ``model_load``: ``AutoModelForCausalLM``, ``AutoModel`` and ``AutoModelForImageTextToText``;
- ``processor``: ``AutoProcessor``, ``processor(images=..., text=...)`` and the chat template, then
  ``generate(max_new_tokens=8, do_sample=False)`` on an image question and a text-only one;
- ``model``: ``generate()`` on the locked lane's processor inputs (the same tensors in every lane);
- ``pipelines``: ``image-text-to-text`` (string form) and ``text-generation`` (chat form);
- ``arguments``: ``dtype=`` and the legacy ``torch_dtype=`` reach the base LM; ``device_map="cpu"``;
  the download arguments transformers passes (``proxies``, ``cache_dir``, ``token``, ``local_files_only``,
  ``force_download``) given explicitly; ``quantization_config`` (4-bit NF4 through bitsandbytes);
- ``hub``: the folder pushed to the local test Hub, loaded by repo id at the pinned revision, model and pipeline.

The locked lane's answers are also checked against the project's own load (``modeling_phiclip`` imported
from the checkout, in this process). The tiny CLIP tower is named in the Hub's checkpoint layout
(``vision_model.*`` keys), which 4.x and 5.x both read to the same weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub, hub_env

pytestmark = pytest.mark.hub_versions

ROOT = Path(__file__).resolve().parents[1]
REPO = "local-user/phiclip-lanes"
LANES = {
    "oldest": (ROOT / ".venv-tf4" / "bin" / "python", "scripts/tf4_setup.sh"),
    "locked": (Path(sys.executable), "scripts/setup.sh"),
    "newest": (ROOT / ".venv-newest" / "bin" / "python", "scripts/newest_setup.sh"),
}

PROBE = r'''
import importlib, importlib.util, json, sys, traceback
from pathlib import Path

# The project's editable install maps its top-level modules with a meta-path finder: drop it,
# so that only the Hub folder's copy of the code can be used.
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
importlib.invalidate_caches()
for name in ("configuration_phiclip", "modeling_phiclip", "processing_phiclip", "train"):
    spec = importlib.util.find_spec(name)
    assert spec is None, f"{name} is importable from {spec.origin}: the test would not exercise remote code"

folder, out, given, repo, sha = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]
import peft, torch, transformers
from PIL import Image
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                          pipeline)

report = {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
          "errors": {}}
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

model = processor = None

@stage("model_load")
def _():
    global model
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    report["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    report["adapter"] = bool(model.has_adapter)
    for auto in (AutoModel, AutoModelForImageTextToText):
        report[auto.__name__] = type(auto.from_pretrained(folder, trust_remote_code=True)).__name__

@stage("processor")
def _():
    global processor
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    report["processor_class"] = f"{type(processor).__module__}.{type(processor).__name__}"
    enc = processor(images=image, text=QUESTION, return_tensors="pt")
    report["image_input_keys"] = sorted(enc.keys())
    chat = processor.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt")
    ids = chat if isinstance(chat, torch.Tensor) else chat["input_ids"]  # 4.57: a tensor; 5.x: a BatchEncoding
    inputs = {"image": {k: enc[k] for k in ("input_ids", "attention_mask", "pixel_values")},
              "text": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    tensors["inputs"] = inputs
    report["image_prompt_ids"] = inputs["image"]["input_ids"][0].tolist()
    report["text_prompt_ids"] = ids[0].tolist()
    report["image_ids"] = answer(model, inputs["image"], "image")
    report["text_ids"] = answer(model, inputs["text"], "text")
    report["image_text"] = processor.decode(report["image_ids"], skip_special_tokens=True)
    report["text_text"] = processor.decode(report["text_ids"], skip_special_tokens=True)

@stage("model")
def _():
    # The locked lane's processor inputs (this run's own when none are given): the model code alone.
    inputs = torch.load(given) if given.is_file() else tensors["inputs"]
    report["model_image_ids"] = answer(model, inputs["image"], "model_image")
    report["model_text_ids"] = answer(model, inputs["text"], "model_text")

@stage("pipelines")
def _():
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    result = pipe(images=image, text=QUESTION, return_full_text=False,
                  generate_kwargs={"max_new_tokens": 8, "do_sample": False})
    report["pipeline_text"] = result[0]["generated_text"]
    text_pipe = pipeline("text-generation", model=str(folder), trust_remote_code=True)
    reply = text_pipe(CHAT, max_new_tokens=8, do_sample=False, return_full_text=False)
    report["text_pipeline_text"] = reply[0]["generated_text"]

@stage("arguments")
def _():
    inputs = tensors["inputs"]["image"]
    for key in ("dtype", "torch_dtype"):
        m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **{key: torch.bfloat16})
        # the LoRA weights stay float32 (PEFT's autocast_adapter_dtype): the base LM, tower and projector are bf16
        parts = (m.get_input_embeddings(), m.vision_tower, m.projector)
        report[f"{key}_bf16"] = sorted({str(next(part.parameters()).dtype) for part in parts})
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, device_map="cpu")
    report["device_map_ids"] = answer(m, inputs, "device_map")
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, proxies=None, token=None,
                                             cache_dir=str(out / "cache"), local_files_only=True,
                                             force_download=False)
    report["download_args_ids"] = answer(m, inputs, "download_args")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        report["quantized"] = "no bitsandbytes"
        return
    from transformers import BitsAndBytesConfig
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, quantization_config=nf4)
    report["quantized"] = sorted({type(mod).__name__ for mod in m.language_model.modules()
                                  if "4bit" in type(mod).__name__})
    report["quantized_ids"] = answer(m, inputs, "quantized")

@stage("hub")
def _():
    if not repo:
        report["hub"] = "no test Hub"
        return
    m = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=sha)
    report["hub_ids"] = answer(m, tensors["inputs"]["image"], "hub")
    pipe = pipeline("image-text-to-text", model=repo, revision=sha, trust_remote_code=True)
    result = pipe(images=image, text=QUESTION, return_full_text=False,
                  generate_kwargs={"max_new_tokens": 8, "do_sample": False})
    report["hub_pipeline_text"] = result[0]["generated_text"]

torch.save(tensors, out / "tensors.pt")
print("RESULT " + json.dumps(report))
'''

PUSH = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[2], exist_ok=True)
print(api.upload_folder(repo_id=sys.argv[2], folder_path=sys.argv[1], commit_message="lanes").oid)
"""


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


def _run(lane: str, folder: Path, work: Path, given: Path, hub: tuple[LocalHub, str]) -> tuple[dict, dict]:
    python, setup = LANES[lane]
    assert python.is_file(), f"lane '{lane}': {python} missing; `make test` builds it ({setup})"
    work.mkdir(parents=True)
    script = work / "probe.py"
    script.write_text(PROBE)
    server, sha = hub
    env = hub_env(server.url, work / "hf-home")
    for name in ("PYTHONPATH", "PYTHONHOME", "HF_MODULES_CACHE"):
        env.pop(name, None)
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    proc = subprocess.run([str(python), str(script), str(folder), str(work), str(given), REPO, sha], cwd=work,
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"lane '{lane}' ({python}) failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    report = json.loads(lines[-1][len("RESULT "):])
    report["stderr"] = proc.stderr
    return report, torch.load(work / "tensors.pt")


@pytest.fixture(scope="module")
def lanes(tiny_run, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Each lane's probe report and tensors, keyed by lane name; the locked lane runs first."""
    root = tmp_path_factory.mktemp("lanes")
    folder = shutil.copytree(tiny_run / "model", root / "phiclip")
    config = json.loads((folder / "config.json").read_text())
    config["vision_model"] = str(_hub_layout_tower(Path(config["vision_model"]), root / "tower"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    given = root / "inputs.pt"  # written after the locked run: the inputs its processor made
    results = {}
    with LocalHub() as server:
        pushed = subprocess.run([sys.executable, "-c", PUSH, str(folder), REPO], env=hub_env(server.url, root / "push"),
                                capture_output=True, text=True, timeout=300, check=False)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        hub = (server, pushed.stdout.split()[-1])
        for lane in LANES:
            results[lane] = _run(lane, folder, root / lane, given, hub)
            if lane == "locked":
                assert not results[lane][0]["errors"], f"locked lane failed: {results[lane][0]['errors']}"
                torch.save(results[lane][1]["inputs"], given)
        unknown = server.unknown_requests()
    assert not unknown, f"requests the test Hub does not model: {unknown}"
    return {"folder": folder, **results}


def _no_error(lanes: dict, lane: str, stage: str) -> dict:
    report = lanes[lane][0]
    error = report["errors"].get(stage)
    assert error is None, f"lane '{lane}' (transformers {report['transformers']}), stage '{stage}': {error}"
    return report


@pytest.mark.parametrize("lane", list(LANES))
def test_versions_and_remote_classes(lanes, lane):
    report = _no_error(lanes, lane, "model_load")
    version = report["transformers"]
    assert version.startswith("4.57.") if lane == "oldest" else version.startswith("5.")
    assert report["torch"] == lanes["locked"][0]["torch"]
    # the remote-code copy of the class, from the folder (transformers_modules), not the project's module
    assert report["model_class"].startswith("transformers_modules.")
    assert report["model_class"].endswith("modeling_phiclip.PhiClipForCausalLM")
    assert report["AutoModel"] == report["AutoModelForImageTextToText"] == "PhiClipForCausalLM"
    assert report["adapter"] is True


def test_newest_lane_is_the_newest_release(lanes):
    """The newest lane holds what scripts/newest_setup.sh resolved from the index on this run."""
    stamp = (ROOT / ".venv-newest" / ".phiclip-newest-setup").read_text().split()
    wanted = dict(item.split("==") for item in stamp if "==" in item)
    report = lanes["newest"][0]
    assert report["transformers"] == wanted["transformers"] and report["peft"] == wanted["peft"]


def test_locked_lane_equals_the_projects_own_load(lanes):
    """The remote code in the locked environment answers as the project's own class does, in this process."""
    from modeling_phiclip import PhiClipForCausalLM

    report, tensors = lanes["locked"]
    model = PhiClipForCausalLM.from_pretrained(lanes["folder"])
    for tag in ("image", "text"):
        inputs = tensors["inputs"][tag]
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()
        torch.testing.assert_close(logits, tensors[f"logits_{tag}"], atol=1e-5, rtol=1e-5)
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert ids.tolist() == report[f"{tag}_ids"]


@pytest.mark.parametrize("lane", ["oldest", "newest"])
def test_same_greedy_ids_and_logits_as_locked(lanes, lane):
    """The model code on the same inputs, then the lane's own processor: same prompt ids, pixels, answers."""
    (locked, tl), (report, tensors) = lanes["locked"], lanes[lane]
    _no_error(lanes, lane, "model")
    _no_error(lanes, lane, "processor")
    assert report["model_image_ids"] == locked["model_image_ids"]
    assert report["model_text_ids"] == locked["model_text_ids"]
    assert report["image_input_keys"] == locked["image_input_keys"] == ["attention_mask", "input_ids", "pixel_values"]
    assert report["image_prompt_ids"] == locked["image_prompt_ids"]
    assert report["text_prompt_ids"] == locked["text_prompt_ids"]
    torch.testing.assert_close(tensors["inputs"]["image"]["pixel_values"], tl["inputs"]["image"]["pixel_values"],
                               atol=1e-5, rtol=1e-5)
    assert report["image_ids"] == locked["image_ids"] and report["text_ids"] == locked["text_ids"]
    for tag in ("model_image", "model_text", "image", "text"):
        torch.testing.assert_close(tensors[f"logits_{tag}"], tl[f"logits_{tag}"], atol=1e-4, rtol=1e-4)
    # the image reaches the answer: its logits are not the text question's
    assert not torch.allclose(tl["logits_model_image"], tl["logits_model_text"])


@pytest.mark.parametrize("lane", list(LANES))
def test_both_pipelines_answer_as_generate(lanes, lane):
    report = _no_error(lanes, lane, "pipelines")
    assert report["pipeline_text"] == report["image_text"]
    assert report["text_pipeline_text"] == report["text_text"]


@pytest.mark.parametrize("lane", list(LANES))
def test_loading_arguments(lanes, lane):
    """dtype/torch_dtype reach the LM; device_map and the download arguments change nothing; NF4 loads and answers."""
    report = _no_error(lanes, lane, "arguments")
    assert report["dtype_bf16"] == report["torch_dtype_bf16"] == ["torch.bfloat16"]
    assert report["device_map_ids"] == report["download_args_ids"] == report["image_ids"]
    assert report["quantized"] == ["Linear4bit"], report["quantized"]
    assert len(report["quantized_ids"]) == 8


@pytest.mark.parametrize("lane", list(LANES))
def test_push_then_load_by_repo_id_at_pinned_revision(lanes, lane):
    report = _no_error(lanes, lane, "hub")
    assert report["hub_ids"] == report["image_ids"]
    assert report["hub_pipeline_text"] == report["image_text"]
