"""Every script in benchmarks/ runs in its small mode and prints its closing ratio line (a benchmark nothing runs rots).

Timings are not asserted (speed is the benchmarks' business, not the tests'): each script must finish,
print its table and end with the line the README quotes. ``benchmarks/gguf.py`` needs llama.cpp and is
run by ``make test-gguf`` (tests/test_gguf_llamacpp.py); ``train_throughput.py`` needs the demo's data.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(os.environ.get("PHICLIP_DEMO_RUN", ROOT / "runs" / "demo"))


def bench(script: str, *args: str, timeout: int = 900) -> str:
    """stdout of ``benchmarks/SCRIPT ARGS`` (asserting exit status 0)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, f"{script} {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def last_line(stdout: str) -> str:
    return stdout.strip().splitlines()[-1]


def test_generate_small(tiny_run):
    out = bench("generate.py", "--run", str(tiny_run), "--small")
    assert "same tokens from all three: True" in out
    assert re.search(r"^PhiClip generate\(\)\s+[0-9.]+\s+[0-9.]+-[0-9.]+\s+[0-9.]+\s+1\.00x$", out, re.M)
    assert re.search(r"^vs transformers generate: [0-9.]+x$", out, re.M)
    assert re.fullmatch(r"speedup: [0-9.]+x", last_line(out))


def test_serve_load_small(serve_run):
    out = bench("serve_load.py", "--run", str(serve_run), "--small")
    assert "4 clients x 3 requests" in out and "\nPASS\n" in out
    assert re.fullmatch(r"batching speedup: [0-9.]+x", last_line(out))


def test_data_throughput_small(tiny_llama_dir):
    out = bench("data_throughput.py", "--small", "--tokenizer", str(tiny_llama_dir))
    rows = [line.split() for line in out.splitlines()
            if line.split()[:1] in (["json"], ["parquet"], ["stream"]) and "/" not in line]
    assert [(r[0], r[1]) for r in rows] == [(p, w) for w in ("0", "1") for p in ("json", "parquet", "stream")]
    assert all(float(r[2]) > 0 for r in rows) and [r[4] for r in rows if r[0] == "json"] == ["1.00x", "1.00x"]
    assert re.search(r"per-image cost .*: [0-9.]+ ms", out)
    assert re.fullmatch(r"parquet / json at 0 workers: [0-9.]+x \(floor 0\.9x\)", last_line(out))


@pytest.mark.skipif(not (DEMO / "eval.json").is_file(), reason="needs the demo's data (run `make demo` first)")
def test_train_throughput_small():
    out = bench("train_throughput.py", "--small")
    assert re.fullmatch(r"speedup: [0-9.]+x", last_line(out))


def test_gpu_check_tiny(capsys):
    """benchmarks/gpu_check.py is run by hand on a GPU machine; ``--tiny`` takes the same path on this CPU:
    both reference stages at their configured batch, each beside the memory model's figures."""
    main = runpy.run_path(str(ROOT / "benchmarks" / "gpu_check.py"), run_name="gpu_check")["main"]
    rows = main(["--tiny", "--steps", "1"])
    assert [(row.stage, row.batch) for row in rows] == [("reference-stage1.yaml", 8), ("reference-stage2.yaml", 4)]
    assert all(row.tokens_s > 0 and not row.oom and row.predicted.peak > row.predicted.held > 0 for row in rows)
    # stage 2 holds LoRA weights, gradients and AdamW states; stage 1 has no LoRA
    assert "LoRA + grads + AdamW (fp32)" in rows[1].predicted.parts
    assert "LoRA + grads + AdamW (fp32)" not in rows[0].predicted.parts
    assert last_line(capsys.readouterr().out).startswith("memory model: reference-stage1.yaml predicts")


def test_real_shape_small(tmp_path):
    """benchmarks/real_shape.py's stages at toy sizes (the GGUF stage runs in make test-gguf): the run trains,
    loads through the Hub files, exports; the memory model matches the bytes the run holds."""
    out = bench("real_shape.py", "--small", "--work", str(tmp_path), "--stages", "build,train,hub,llava,vllm_lora")
    assert last_line(out) == "real shape (small): 5/5 stages done"
    assert "vllm-lora export: 16/16 adapter tensors under names vLLM's Phi-3 maps; unmapped 0, wrong shape 0" in out
    real_shape = runpy.run_path(str(ROOT / "benchmarks" / "real_shape.py"), run_name="real_shape")
    rows = {name: (predicted, measured) for name, predicted, measured in real_shape["memory_rows"](tmp_path, "small")}
    for name in ("LM embeddings, head, norms", "vision tower", "LoRA + projector: weights, grads, AdamW",
                 "one layer recomputed (no checkpointing)"):
        predicted, measured = rows[name]
        assert measured == pytest.approx(predicted, rel=0.02), name
    predicted, measured = rows["saved activations, checkpointed forward"]
    assert measured == pytest.approx(predicted, rel=0.15)
