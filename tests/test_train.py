"""Training: stages, QLoRA on CPU, resume after a crash, continued rounds, transforms, run directory."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import make_toy_data, tiny_config
from safetensors.torch import load_file

from train.config import load_config
from train.dataset import LlavaDataset
from train.images import ImageResolver
from train.records import read_records
from train.template import IGNORE_INDEX
from train.build import build_model
from train.run import train


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def test_run_directory_layout(tiny_run):
    for name in ("config.yaml", "projector.safetensors", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "processor/tokenizer.json", "data_report.json",
                 "log_history.json", "loss.png", "rounds.json"):
        assert (tiny_run / name).exists(), name
    adapter = load_file(str(tiny_run / "adapter/adapter_model.safetensors"))
    assert adapter and all("lora_" in k and "language_model" in k for k in adapter)
    report = json.loads((tiny_run / "data_report.json").read_text())
    assert report["n_read"] == 13 and report["n_kept"] == 13
    assert load_config(tiny_run / "config.yaml").train.max_steps == 4


def test_loss_goes_down(tiny_run):
    curve = losses(tiny_run)
    assert len(curve) == 4 and curve[-1] < curve[0]


def test_stage1_trains_projector_only(tmp_path, tiny_llama_dir, tiny_clip_dir):
    data = make_toy_data(tmp_path)
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "run", stage=1, max_steps=2)
    run = train(cfg)
    assert (run / "projector.safetensors").is_file()
    assert not (run / "adapter").exists()
    fresh = build_model(cfg.model).model.model.multi_modal_projector.state_dict()
    trained = load_file(str(run / "projector.safetensors"))
    assert not torch.allclose(fresh["linear_2.weight"], trained["linear_2.weight"])

    # stage 2 starts from the stage-1 projector and adds a fresh adapter
    cfg2 = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "stage2", max_steps=1,
                       projector_learning_rate=1e-9, continue_from=str(run))
    run2 = train(cfg2)
    carried = load_file(str(run2 / "projector.safetensors"))
    assert torch.allclose(carried["linear_2.weight"], trained["linear_2.weight"], atol=1e-6)
    assert (run2 / "adapter" / "adapter_model.safetensors").is_file()
    assert len(json.loads((run2 / "rounds.json").read_text())) == 2


def test_qlora_step_on_cpu(tmp_path, tiny_llama_dir, tiny_clip_dir):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, make_toy_data(tmp_path), tmp_path / "run", max_steps=2)
    cfg.lora.quantize = "nf4"
    run = train(cfg)
    curve = losses(run)
    assert len(curve) == 2 and all(torch.isfinite(torch.tensor(curve)))
    from chat.assistant import VisionChat

    chat = VisionChat.from_run(run)
    linear_types = {type(m).__name__ for m in chat.model.modules()}
    assert "Linear4bit" in linear_types


CRASH_HOOK = """
from transformers import TrainerCallback
import train.trainer as T

class Crash(TrainerCallback):
    def on_save(self, args, state, control, **kw):
        if state.global_step >= CRASH_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)

_init = T.PhiClipTrainer.__init__

def init(self, *a, **k):
    _init(self, *a, **k)
    self.add_callback(Crash())

T.PhiClipTrainer.__init__ = init
"""


def _train_script(cfg_path, crash_after: int | None) -> str:
    lines = [
        "import os, signal, sys, torch",
        "torch.set_num_threads(1)",
        "from train.config import load_config",
        "from train.run import train",
    ]
    if crash_after is not None:
        lines += [f"CRASH_AFTER = {crash_after}", CRASH_HOOK]
    lines.append(f"train(load_config({str(cfg_path)!r}), resume=len(sys.argv) > 1)")
    return "\n".join(lines) + "\n"


def test_resume_after_kill_reproduces_loss_curve(tmp_path, tiny_llama_dir, tiny_clip_dir):
    data = make_toy_data(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    curves = {}
    for name, crash in (("straight", None), ("crashed", 4)):
        cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / name, max_steps=6, save_steps=2)
        cfg.lora.dropout = 0.1  # RNG state must be restored too
        cfg_path = tmp_path / f"{name}.yaml"
        cfg.save(cfg_path)
        script = tmp_path / f"{name}.py"
        script.write_text(_train_script(cfg_path, crash))
        first = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
        if crash is None:
            assert first.returncode == 0, first.stderr[-2000:]
        else:
            assert first.returncode == -signal.SIGKILL
            assert not (tmp_path / name / "projector.safetensors").exists()
            script.write_text(_train_script(cfg_path, None))
            resumed = subprocess.run([sys.executable, str(script), "resume"], env=env, capture_output=True, text=True)
            assert resumed.returncode == 0, resumed.stderr[-2000:]
        curves[name] = losses(tmp_path / name)
    straight, crashed = curves["straight"], curves["crashed"]
    assert len(straight) == 6 and len(crashed) == 6  # steps 1-4 from the checkpoint, 5-6 after resuming
    assert crashed == pytest.approx(straight, rel=1e-4)
    a = load_file(str(tmp_path / "straight" / "projector.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "projector.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_continued_round_starts_from_and_keeps_earlier_weights(tmp_path, tiny_run, tiny_llama_dir, tiny_clip_dir):
    data = make_toy_data(tmp_path)
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "round2", max_steps=1,
                      learning_rate=1e-9, projector_learning_rate=1e-9, continue_from=str(tiny_run))
    run = train(cfg)
    before = load_file(str(tiny_run / "adapter/adapter_model.safetensors"))
    after = load_file(str(run / "adapter/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    lora_b = [v for k, v in before.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b), "round 1 must have trained its adapter"
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["continued_from"] == str(tiny_run)
    assert (tiny_run / "projector.safetensors").exists()  # round 1 left untouched


def test_validation_split_is_stable_and_disjoint(tmp_path, tiny_llama_dir, tiny_clip_dir):
    from train.records import Record, Turn
    from train.run import split_records

    records = [Record(id=f"id{i}", turns=[Turn("user", "q"), Turn("assistant", "a")]) for i in range(200)]
    records += read_records(make_toy_data(tmp_path)[0])[0]
    train_a, val_a, _ = split_records(records, 0.3, set())
    assert 0.2 < len(val_a) / len(records) < 0.4
    train_b, val_b, _ = split_records(records, 0.3, set())
    assert [r.id for r in val_a] == [r.id for r in val_b] and val_a
    assert not {r.id for r in val_a} & {r.id for r in train_a}
    train_c, _, excluded = split_records(records, 0.0, {"r0"})
    assert excluded == 2 and "r0" not in {r.id for r in train_c}


@pytest.mark.parametrize("stopwords, punctuation, expected", [
    (False, False, "It is bright."), (True, False, "bright."), (False, True, "It is bright"), (True, True, "bright"),
])
def test_answer_transforms_reach_the_labels(tmp_path, tiny_llama_dir, tiny_clip_dir, stopwords, punctuation, expected):
    path, images = make_toy_data(tmp_path)
    built = build_model(tiny_config(tiny_llama_dir, tiny_clip_dir, (path, images), tmp_path).model)
    records, report = read_records(path)
    ds = LlavaDataset(records[1:2], tokenizer=built.tokenizer, image_processor=built.image_processor,
                      resolver=ImageResolver(images), image_token="<image>", n_image_tokens=built.n_image_tokens,
                      max_length=256, report=report, drop_stopwords=stopwords, drop_punctuation=punctuation)
    labels = ds[0]["labels"]
    first_answer = []
    for label in labels.tolist():
        if label == IGNORE_INDEX and first_answer:
            break
        if label != IGNORE_INDEX:
            first_answer.append(label)
    assert built.tokenizer.decode(first_answer) == expected + "<|im_end|>"


def test_bad_records_never_stop_training(tmp_path, tiny_llama_dir, tiny_clip_dir):
    path, images = make_toy_data(tmp_path)
    records = json.loads(path.read_text())
    (images / "img3.png").write_bytes(b"garbage")  # fails only when decoded, mid-run
    records.append({"id": "gone", "image": "missing.png", "conversations": records[0]["conversations"]})
    records.append({"id": "long", "image": "img1.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "word " * 400}, {"from": "gpt", "value": "ok"}]})
    path.write_text(json.dumps(records))
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (path, images), tmp_path / "run", max_steps=8)
    run = train(cfg)
    report = json.loads((run / "data_report.json").read_text())
    reasons = {p["record"]: p["reason"] for p in report["problems"]}
    assert "missing image" in reasons["gone"]
    assert "too long" in reasons["long"]
    assert "unreadable image" in reasons["r1"]  # img3.png belongs to record id r1
    assert report["n_read"] == 15
