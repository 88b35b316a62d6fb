"""Training: stages, QLoRA on CPU, resume after a crash, continued rounds, transforms, run directory."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_toy_data, tiny_config
from safetensors.torch import load_file

from data.dataset import LlavaDataset
from data.images import ImageResolver
from data.sources import read_records
from data.template import IGNORE_INDEX
from runtime.config import load_config
from train.build import build_model
from train.run import train


def losses(run_dir):
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


def test_run_directory_layout(tiny_run):
    for name in ("config.yaml", "model/config.json", "model/projector.safetensors", "model/adapter/adapter_config.json",
                 "model/adapter/adapter_model.safetensors", "model/tokenizer.json", "model/processor_config.json",
                 "model/modeling_phiclip.py", "model/README.md", "data_report.json",
                 "log_history.json", "loss.png", "rounds.json"):
        assert (tiny_run / name).exists(), name
    assert not (tiny_run / "model" / "adapter_config.json").exists()  # at the root it would hijack AutoModel
    assert not list((tiny_run / "model").glob("model*.safetensors"))  # base LM and tower are referenced by name
    adapter = load_file(str(tiny_run / "model/adapter/adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
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
    assert (run / "model/projector.safetensors").is_file()
    assert not (run / "model/adapter").exists()
    fresh = build_model(cfg.model).model.projector.state_dict()
    trained = load_file(str(run / "model/projector.safetensors"))
    assert not torch.allclose(fresh["linear_2.weight"], trained["linear_2.weight"])

    # stage 2 starts from the stage-1 projector and adds a fresh adapter
    cfg2 = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "stage2", max_steps=1,
                       projector_learning_rate=1e-9, continue_from=str(run))
    run2 = train(cfg2)
    carried = load_file(str(run2 / "model/projector.safetensors"))
    assert torch.allclose(carried["linear_2.weight"], trained["linear_2.weight"], atol=1e-6)
    assert (run2 / "model/adapter/adapter_model.safetensors").is_file()
    assert len(json.loads((run2 / "rounds.json").read_text())) == 2


def test_qlora_step_on_cpu(tmp_path, tiny_llama_dir, tiny_clip_dir):
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, make_toy_data(tmp_path), tmp_path / "run", max_steps=2)
    cfg.lora.quantize = "nf4"
    run = train(cfg)
    curve = losses(run)
    assert len(curve) == 2 and all(torch.isfinite(torch.tensor(curve)))
    from chat.assistant import VisionChat

    chat = VisionChat.load(run)
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
        "from runtime.config import load_config",
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
            assert not (tmp_path / name / "model/projector.safetensors").exists()
            script.write_text(_train_script(cfg_path, None))
            resumed = subprocess.run([sys.executable, str(script), "resume"], env=env, capture_output=True, text=True)
            assert resumed.returncode == 0, resumed.stderr[-2000:]
        curves[name] = losses(tmp_path / name)
    straight, crashed = curves["straight"], curves["crashed"]
    assert len(straight) == 6 and len(crashed) == 6  # steps 1-4 from the checkpoint, 5-6 after resuming
    assert crashed == pytest.approx(straight, rel=1e-4)
    a = load_file(str(tmp_path / "straight" / "model/projector.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "model/projector.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_continued_round_starts_from_and_keeps_earlier_weights(tmp_path, tiny_run, tiny_llama_dir, tiny_clip_dir):
    data = make_toy_data(tmp_path)
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "round2", max_steps=1,
                      learning_rate=1e-9, projector_learning_rate=1e-9, continue_from=str(tiny_run))
    run = train(cfg)
    before = load_file(str(tiny_run / "model/adapter/adapter_model.safetensors"))
    after = load_file(str(run / "model/adapter/adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    lora_b = [v for k, v in before.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_b), "round 1 must have trained its adapter"
    rounds = json.loads((run / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["continued_from"] == str(tiny_run)
    assert (tiny_run / "model/projector.safetensors").exists()  # round 1 left untouched


def test_validation_split_is_stable_and_disjoint(tmp_path, tiny_llama_dir, tiny_clip_dir):
    from data.records import Record, Turn
    from train.run import split_records

    records = [Record(id=f"id{i}", turns=[Turn("user", "q"), Turn("assistant", "a")]) for i in range(200)]
    records += read_records(make_toy_data(tmp_path)[0])[0]
    train_a, val_a, _ = split_records(records, 0.3, set())
    assert 0.2 < len(val_a) / len(records) < 0.4
    train_b, val_b, _ = split_records(records, 0.3, set())
    assert [r.id for r in val_a] == [r.id for r in val_b] and val_a
    assert not {r.id for r in val_a} & {r.id for r in train_a}
    train_c, _, excluded = split_records(records, 0.0, {"r0"})
    assert [r.id for r in excluded] == ["r0", "r0"] and "r0" not in {r.id for r in train_c}


def test_records_held_out_for_the_eval_set_are_reported_by_file_and_id(tmp_path, tiny_llama_dir, tiny_clip_dir):
    path, images = make_toy_data(tmp_path)
    eval_path = tmp_path / "eval.json"
    eval_path.write_text(json.dumps([r for r in json.loads(path.read_text()) if r["id"] == "r2"][:1]))
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (path, images), tmp_path / "run", max_steps=1)
    cfg.data.eval = str(eval_path)
    report = json.loads((train(cfg) / "data_report.json").read_text())
    held_out = [p for p in report["problems"] if p["reason"].startswith("in eval set")]
    assert [(p["file"], p["record"]) for p in held_out] == [(str(path), "r2"), (str(path), "r2")]
    assert str(eval_path) in held_out[0]["reason"]
    assert report["n_kept"] == 11


@pytest.mark.parametrize("ratio", [1.0, 3.0, -0.1])
def test_warmup_ratio_outside_0_1_is_refused(tmp_path, ratio):
    cfg = tiny_config(tmp_path / "lm", tmp_path / "clip", make_toy_data(tmp_path), tmp_path / "run", warmup_ratio=ratio)
    with pytest.raises(ValueError, match=r"train\.warmup_ratio .*0 <= ratio < 1"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path):
    from train.run import _training_args

    cfg = tiny_config(tmp_path / "lm", tmp_path / "clip", (tmp_path, tmp_path), tmp_path / "run", warmup_ratio=0.25)
    args = _training_args(cfg, tmp_path, torch.device("cpu"), torch.float32)
    assert [args.get_warmup_steps(n) for n in (4, 100, 1000)] == [1, 25, 250]


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_optimizer_follows_training_arguments(tmp_path, tiny_llama_dir, tiny_clip_dir, optim):
    """args.optim picks the class, adam_epsilon reaches AdamW, and biases and norms get no weight decay."""
    from transformers import TrainingArguments

    from train.run import prepare_model
    from train.trainer import PhiClipTrainer

    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (tmp_path, tmp_path), tmp_path / "run", train_vision_tower=True)
    model = prepare_model(cfg, torch.device("cpu")).model
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, optim=optim, learning_rate=1e-4,
                             weight_decay=0.1, adam_epsilon=1e-5, report_to="none")
    optimizer = PhiClipTrainer(model=model, args=args, projector_lr=3e-3).create_optimizer()

    assert type(optimizer) is {"adamw_torch": torch.optim.AdamW, "sgd": torch.optim.SGD}[optim]
    if optim == "adamw_torch":
        assert {g["eps"] for g in optimizer.param_groups} == {1e-5}
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert len(group_of) == len(trainable) == sum(len(g["params"]) for g in optimizer.param_groups)
    norms = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)
             for n, _ in module.named_parameters(recurse=False)}
    assert norms & trainable.keys()  # the tower's LayerNorms train too
    for name, param in trainable.items():
        group = group_of[id(param)]
        assert group["lr"] == (3e-3 if name.startswith("projector.") else 1e-4), name
        no_decay = name.endswith("bias") or name in norms
        assert group["weight_decay"] == (0.0 if no_decay else 0.1), name


@pytest.mark.parametrize("stopwords, punctuation, expected", [
    (False, False, "It is bright."), (True, False, "bright."), (False, True, "It is bright"), (True, True, "bright"),
])
def test_answer_transforms_reach_the_labels(tmp_path, tiny_llama_dir, tiny_clip_dir, nltk_stopwords, stopwords,
                                           punctuation, expected):
    path, images = make_toy_data(tmp_path)
    built = build_model(tiny_config(tiny_llama_dir, tiny_clip_dir, (path, images), tmp_path).model)
    records, report = read_records(path)
    ds = LlavaDataset(records[1:2], processor=built.processor,
                      resolver=ImageResolver(images), n_image_tokens=built.n_image_tokens,
                      max_length=256, report=report, drop_stopwords=stopwords, drop_punctuation=punctuation)
    labels = ds[0]["labels"]
    first_answer = []
    for label in labels.tolist():
        if label == IGNORE_INDEX and first_answer:
            break
        if label != IGNORE_INDEX:
            first_answer.append(label)
    assert built.tokenizer.decode(first_answer) == expected + "<|im_end|>"


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_image_is_reported_once_and_not_opened_again(tmp_path, tiny_llama_dir, tiny_clip_dir, monkeypatch, workers):
    import processing_phiclip

    path, images = make_toy_data(tmp_path)
    (images / "img3.png").write_bytes(b"garbage")  # record id r1; fails only when decoded, mid-run
    attempts = tmp_path / "attempts.txt"
    opened = processing_phiclip.open_image

    def open_image(image_path, *args, **kwargs):
        if str(image_path).endswith("img3.png"):
            with attempts.open("a") as f:  # appended to by the worker processes too
                f.write("img3\n")
        return opened(image_path, *args, **kwargs)

    monkeypatch.setattr(processing_phiclip, "open_image", open_image)
    # 13 records, 2 a step: 21 steps are three epochs
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, (path, images), tmp_path / "run", max_steps=21, save_steps=100,
                      dataloader_workers=workers)
    report = json.loads((train(cfg) / "data_report.json").read_text())
    bad = [p for p in report["problems"] if p["reason"].startswith("unreadable image")]
    assert [(p["file"], p["record"]) for p in bad] == [(str(path), "r1")]
    assert "img3.png" in bad[0]["reason"]
    assert report["n_kept"] == 12 and report["n_skipped"] == 1
    assert attempts.read_text().split() == ["img3"]


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


def test_offline_qlora_train_and_chat_print_no_kernel_fetch_notice(tmp_path, tiny_llama_dir, tiny_clip_dir):
    """Offline, `phiclip train` (NF4) and `phiclip chat` on its run print nothing about fetching kernels,
    no deprecation warning of PhiClip's own checkpointing call, and no error line."""
    pytest.importorskip("bitsandbytes")
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, make_toy_data(tmp_path), tmp_path / "run", max_steps=2)
    cfg.lora.quantize = "nf4"
    cfg.save(tmp_path / "qlora.yaml")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    trained = subprocess.run([sys.executable, "-m", "phiclip_cli", "train", str(tmp_path / "qlora.yaml")],
                             capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    answered = subprocess.run([sys.executable, "-m", "phiclip_cli", "chat", str(tmp_path / "run"), "Hello?",
                               "--max-new-tokens", "2"], capture_output=True, text=True, env=env, cwd=root,
                              timeout=600)
    assert answered.returncode == 0, answered.stderr[-3000:]
    for stderr in (trained.stderr, answered.stderr):
        assert "kernels-community" not in stderr and "gemm_4bit_forward" not in stderr
        assert "gradient_checkpointing_enable" not in stderr
        assert not [line for line in stderr.splitlines() if "ERROR" in line or line.startswith("Error")]
