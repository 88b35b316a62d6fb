"""Data-parallel training on this CPU: ``accelerate launch`` with two gloo processes; the shipped launch configs;
the GPU check's CPU smoke run.

Two processes with one sample each per step must train exactly as one process with two: the same
global batch (every rank draws the same order, grouped by length per global batch, and rank r takes
the r-th share of each step's samples), no dropout, and the loss averaged over the global batch's
tokens (the Trainer's ``average_tokens_across_devices``), not per process. Answers of different
lengths make the two processes' token counts differ, so a per-process mean would show in the curve.
Only rank 0 may write the run directory, and a group torn down by a SIGKILL must resume to the same curve.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config, write_image
from safetensors.torch import load_file

from runtime.config import RunConfig
from train.run import train

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_CONFIG = ROOT / "configs" / "accelerate" / "cpu-2proc.yaml"
STEPS, KILL_AT = 6, 5

# Imported by every Python process the test starts (a sitecustomize on PYTHONPATH). In a launched
# rank it records what the process writes, deletes or creates under RUN_DIR (Python-level file
# events: writes from C, such as torch.save's, do not show) and, with KILL_AT_STEP set, SIGKILLs
# rank 1 at the end of that step.
SITECUSTOMIZE = '''
import atexit, json, os, signal, sys

if "RANK" in os.environ:
    RANK, RUN = os.environ["RANK"], os.environ["RUN_DIR"]
    WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
    touched = set()

    def audit(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        elif event in WRITE_EVENTS:
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, (str, os.PathLike)):
            path = os.path.abspath(path)
            if path.startswith(RUN + os.sep):
                touched.add(os.path.relpath(path, RUN))

    sys.addaudithook(audit)

    @atexit.register
    def report():
        with open(os.path.join(os.environ["WRITES_DIR"], f"rank{RANK}-{os.getpid()}.json"), "w") as f:
            json.dump(sorted(touched), f)

    if RANK == "1" and os.environ.get("KILL_AT_STEP"):
        from transformers import TrainerCallback
        import train.trainer as T

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == int(os.environ["KILL_AT_STEP"]):
                    os.kill(os.getpid(), signal.SIGKILL)

        init = T.PhiClipTrainer.__init__

        def with_kill(self, *a, **k):
            init(self, *a, **k)
            self.add_callback(Kill())

        T.PhiClipTrainer.__init__ = with_kill
'''


def _data(root: Path) -> tuple[Path, Path]:
    """Twelve records: answers of 1-4 clauses, three text-only (a rank whose whole batch has no image
    leaves the projector out of its backward pass) and three unreadable images (found mid-run by
    whichever rank meets them, replaced by the next record)."""
    images = root / "images"
    images.mkdir()
    records = []
    for i in range(12):
        answer = ", ".join(["It is bright"] + ["it is round"] * (i % 4)) + "."
        record = {"id": f"r{i}", "conversations": [{"from": "human", "value": "Describe it."},
                                                   {"from": "gpt", "value": answer}]}
        if i not in (2, 7, 10):
            record["image"] = f"img{i}.png"
            record["conversations"][0]["value"] = "<image>\nDescribe it."
            if i in (3, 5, 9):
                (images / f"img{i}.png").write_bytes(b"not a png")
            else:
                write_image(images / f"img{i}.png", i)
        records.append(record)
    path = root / "train.json"
    path.write_text(json.dumps(records))
    return path, images


def _config(lm: Path, clip: Path, data: tuple[Path, Path], out: Path, batch_size: int) -> RunConfig:
    return tiny_config(lm, clip, data, out, max_steps=STEPS, batch_size=batch_size, save_steps=2,
                       learning_rate=2e-2, projector_learning_rate=2e-2, warmup_ratio=0.0)


def _launch(cfg_path: Path, run: Path, writes: Path, *extra: str,
            kill_at: int | None = None) -> subprocess.CompletedProcess[str]:
    """``accelerate launch ... -m phiclip_cli train CONFIG``; each rank logs its writes into ``writes``."""
    hooks = writes.parent / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    writes.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)]), "RUN_DIR": str(run),
           "WRITES_DIR": str(writes), "KILL_AT_STEP": str(kill_at or "")}
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(LAUNCH_CONFIG),
               "-m", "phiclip_cli", "train", str(cfg_path), *extra]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _losses(run: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run / "log_history.json").read_text()) if "loss" in h]


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _writes(folder: Path, rank: int) -> set[str]:
    return {path for log in folder.glob(f"rank{rank}-*.json") for path in json.loads(log.read_text())}


def _problems(run: Path) -> tuple[int, set[tuple[str, str]]]:
    report = json.loads((run / "data_report.json").read_text())
    return report["n_kept"], {(p["record"], p["reason"]) for p in report["problems"]}


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(tmp_path, tiny_llama_dir, tiny_clip_dir):
    data = _data(tmp_path)
    single = train(_config(tiny_llama_dir, tiny_clip_dir, data, tmp_path / "single", batch_size=2))
    expected = _losses(single)
    assert len(expected) == STEPS

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for run in (straight, killed):
        _config(tiny_llama_dir, tiny_clip_dir, data, run, batch_size=1).save(tmp_path / f"{run.name}.yaml")

    done = _launch(tmp_path / "straight.yaml", straight, tmp_path / "writes-straight")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _losses(straight) == pytest.approx(expected, rel=1e-4)
    assert done.stdout.count("records read") == 1  # the data report is printed once, by rank 0

    # Rank 0 writes the run directory. Rank 1 writes only its RNG state into each checkpoint (the Trainer's
    # rng_state_1.pth, needed to resume; torch.save writes it from C, so only the folder shows here).
    expected_files = {f.replace("rng_state.pth", "rng_state_0.pth") for f in _files(single)}
    expected_files |= {f.replace("rng_state_0", "rng_state_1") for f in expected_files if "rng_state_0" in f}
    assert _files(straight) == expected_files
    rank1 = _writes(tmp_path / "writes-straight", 1)
    assert all(Path(p).parent == Path("checkpoints") for p in rank1), rank1
    assert {"config.yaml", "data_report.json", "log_history.json", "loss.png", "rounds.json",
            "model/config.json"} <= _writes(tmp_path / "writes-straight", 0)
    assert _problems(straight) == _problems(single) and _problems(single)[1]  # rank 1's bad images included
    a = load_file(str(single / "model/projector.safetensors"))
    b = load_file(str(straight / "model/projector.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    crashed = _launch(tmp_path / "killed.yaml", killed, tmp_path / "writes-killed", kill_at=KILL_AT)
    assert crashed.returncode != 0 and "SIGKILL" in crashed.stderr, crashed.stderr[-3000:]
    assert not (killed / "model").exists()
    assert (killed / "checkpoints" / f"checkpoint-{KILL_AT - 1}" / "trainer_state.json").is_file()
    resumed = _launch(tmp_path / "killed.yaml", killed, tmp_path / "writes-resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(killed) == pytest.approx(expected, rel=1e-4)
    c = load_file(str(killed / "model/projector.safetensors"))
    assert all(torch.allclose(b[k], c[k], atol=1e-5) for k in b)


def test_shipped_accelerate_configs_load_and_name_only_known_options():
    """What ``accelerate launch --config_file`` reads: accelerate's loader refuses unknown top-level keys; the
    nested DeepSpeed and FSDP settings become launcher options, so each must be one ``accelerate launch`` has."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    options = {action.dest for action in launch_command_parser()._actions}
    kinds = {}
    for path in sorted(LAUNCH_CONFIG.parent.glob("*.yaml")):
        config = load_config_from_file(str(path))
        nested = {**(config.deepspeed_config or {}), **(config.fsdp_config or {})}
        assert set(nested) <= options, (path.name, set(nested) - options)
        kinds[path.stem] = (config.distributed_type.value, (config.deepspeed_config or {}).get("zero_stage"))
    assert kinds == {"cpu-2proc": ("MULTI_GPU", None), "ddp": ("MULTI_GPU", None), "fsdp": ("FSDP", None),
                     "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3)}
