"""Push to a local stand-in of the Hub, then load from it as a Hub user: folder, repo id, pinned revision, pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import without_project, write_image
from hub_server import LocalHub, hub_env

ROOT = Path(__file__).resolve().parent.parent
REPO = "local-user/phiclip-tiny"

PUSH = """
import json, sys
import torch
from safetensors.torch import load_file, save_file
from huggingface_hub import HfApi
from publish.push import push
run, image, out = sys.argv[1:4]
first = push(run, "{repo}", [(image, "Is it bright?"), (image, "What is it?")])
# A second commit that changes the projector: main moves on, the first sha must still give the first model.
state = {{k: v + torch.randn_like(v) for k, v in load_file(run + "/model/projector.safetensors").items()}}
save_file(state, out + ".projector.safetensors")
second = HfApi().upload_file(path_or_fileobj=out + ".projector.safetensors", path_in_repo="projector.safetensors",
                             repo_id="{repo}")
json.dump({{"first": first.oid, "second": second.oid}}, open(out, "w"))
""".format(repo=REPO)

LOAD = """
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline
folder, first, image_path, out = sys.argv[1:5]
image = Image.open(image_path).convert("RGB")

def answer(model, processor):
    inputs = processor(images=image, text="Is it bright?", return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1, :50].tolist()
    return ids[0, inputs["input_ids"].shape[1]:].tolist(), logits

results = {}
for name, source, revision in (("folder", folder, None), ("main", "%s", None), ("pinned", "%s", first)):
    model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True, revision=revision)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True, revision=revision)
    results[name], results[name + "_logits"] = answer(model, processor)
    results[name + "_class"] = type(model).__name__
for auto in (AutoModel, AutoModelForImageTextToText):
    results[auto.__name__] = type(auto.from_pretrained("%s", trust_remote_code=True, revision=first)).__name__
pipe = pipeline("image-text-to-text", model="%s", revision=first, trust_remote_code=True)
reply = pipe(images=image, text="Is it bright?", generate_kwargs={"max_new_tokens": 6}, return_full_text=False)
results["pipeline"] = reply[0]["generated_text"]
results["pinned_text"] = processor.decode(results["pinned"], skip_special_tokens=True)
json.dump(results, open(out, "w"))
""" % (REPO, REPO, REPO, REPO)


def test_push_then_load_by_repo_id_revision_and_pipeline(tiny_run, tmp_path):
    image = write_image(tmp_path / "probe.png", seed=3, size=40)
    with LocalHub() as hub:
        env = hub_env(hub.url, tmp_path / "hf-home")
        pushed = subprocess.run([sys.executable, "-c", PUSH, str(tiny_run), str(image), str(tmp_path / "push.json")],
                                env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert pushed.returncode == 0, pushed.stderr[-3000:] + "\n".join(hub.unknown_requests())
        shas = json.loads((tmp_path / "push.json").read_text())
        cli = subprocess.run([sys.executable, "-m", "phiclip_cli", "push", str(tiny_run), "local-user/from-cli"],
                             env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert cli.returncode == 0, cli.stderr[-3000:]
        assert f"revision={hub.commits('local-user/from-cli')[-1]!r}" in cli.stdout
        assert "examples/0.png" in hub.files("local-user/from-cli")  # default examples: the run's own data
        files = hub.files(REPO, shas["first"])
        for name in ("config.json", "configuration_phiclip.py", "modeling_phiclip.py", "processing_phiclip.py",
                     "projector.safetensors", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                     "processor_config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                     "README.md", "examples/0.png"):
            assert name in files, name
        assert "adapter_config.json" not in files  # at the root it would turn the repo into a plain PEFT model
        assert not any(n.startswith("model") and n.endswith(".safetensors") for n in files)  # bases by name
        assert hub.commits(REPO)[1] == shas["first"]  # everything in one commit after the Hub's initial one

        card = files["README.md"].decode()
        assert "pipeline_tag: image-text-to-text" in card and "custom_code" in card and "widget:" in card
        assert f"{hub.url}/{REPO}/resolve/main/examples/0.png" in card

        script = without_project(ROOT) + LOAD
        loaded = subprocess.run([sys.executable, "-c", script, str(tiny_run / "model"), shas["first"], str(image),
                                 str(tmp_path / "load.json")], env=env, capture_output=True, text=True,
                                timeout=600, cwd=tmp_path)
        assert loaded.returncode == 0, loaded.stderr[-3000:] + "\n".join(hub.unknown_requests())
        assert not hub.unknown_requests()
    results = json.loads((tmp_path / "load.json").read_text())
    assert results["pinned"] == results["folder"] and results["pinned_logits"] == results["folder_logits"]
    assert results["main_logits"] != results["folder_logits"], "main holds the changed projector"
    assert {results[k] for k in ("folder_class", "main_class", "pinned_class", "AutoModel",
                                 "AutoModelForImageTextToText")} == {"PhiClipForCausalLM"}
    assert results["pipeline"].strip() == results["pinned_text"].strip()
    # The card's widget shows the model's real answer to its example question.
    assert "output:\n    text: " in card
