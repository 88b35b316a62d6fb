"""Serve an export with vLLM's CPU build and ask it one image and one text question.

Needs the vLLM venv that ``scripts/vllm_setup.sh`` makes (``.venv-vllm``, or ``VLLM_VENV``);
skipped without it. Exports the demo run when ``PHICLIP_DEMO_RUN`` names one, else a tiny
run whose LM has a head size vLLM's CPU attention supports (32; the shared tiny LM's 16 is
not). Startup takes minutes (torch.compile warm-up): deselect with ``-m "not vllm"``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import make_toy_data, tiny_config, tokenizer_with_template, write_image
from PIL import Image

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
STARTUP_S = 900
if not (VENV / "bin" / "python").is_file():
    pytest.skip(f"vLLM is not installed (no {VENV}; run scripts/vllm_setup.sh)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())


def _vllm_ready_run(root: Path, smol_tokenizer_dir: Path, clip_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.run import train

    tok = tokenizer_with_template(smol_tokenizer_dir, "chatml")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,  # head_dim 32
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    lm = root / "lm"
    LlamaForCausalLM(config).save_pretrained(lm)
    tok.save_pretrained(lm)
    cfg = tiny_config(lm, clip_dir, make_toy_data(root), root / "run", max_steps=2)
    # The demo's settings: last-layer features with the CLS token, and a system prompt.
    cfg.model.vision_feature_layer = -1
    cfg.model.vision_feature_select_strategy = "full"
    cfg.data.system_prompt = "You answer questions about images."
    return train(cfg)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smol_tokenizer_dir, tiny_clip_dir):
    from export.checkpoint import export_run

    root = tmp_path_factory.mktemp("vllm")
    demo = os.environ.get("PHICLIP_DEMO_RUN")
    run = Path(demo) if demo else _vllm_ready_run(root, smol_tokenizer_dir, tiny_clip_dir)
    out = export_run(run, root / "export", dtype="float32")
    port = _free_port()
    # float32 on both sides for the logit comparison (vLLM's CPU default for "auto" is bfloat16).
    env = dict(os.environ, PORT=str(port), SERVED_NAME="phiclip-test", VLLM_CPU_KVCACHE_SPACE="1", VLLM_DTYPE="float32",
               VLLM_MAX_MODEL_LEN="512" if not demo else "2048", VLLM_VENV=str(VENV))
    log = root / "vllm.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "vllm_serve.sh"), str(out)], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if _get(base + "/health") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not ready after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(3)
        yield base, out, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _hf_first_token(out: Path, content: list[dict], image: Image.Image | None):
    """Prompt length and top-5 (token, logprob) of the next token, from transformers on the same export."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[image] if image is not None else None, text=text, return_tensors="pt")
    with torch.no_grad():
        logprobs = model(**inputs).logits[0, -1].log_softmax(-1)
    values, ids = logprobs.topk(5)
    return inputs["input_ids"].shape[1], [(processor.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]


def test_vllm_serves_export(served, tmp_path):
    base, out, _log = served
    side = json.loads((out / "config.json").read_text())["vision_config"]["image_size"]
    # An image already at the tower's size: no resampling, so vLLM's and transformers'
    # image processors (torchvision vs PIL backends) see identical pixels.
    image_path = write_image(tmp_path / "probe.png", seed=11, size=side)
    url = "data:image/png;base64," + base64.b64encode(image_path.read_bytes()).decode()
    question = "What colour is the shape?"
    image_reply = _post(base + "/v1/chat/completions", {
        "model": "phiclip-test",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": question}]}],
        "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 5,
    })
    text_reply = _post(base + "/v1/chat/completions", {
        "model": "phiclip-test", "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4, "temperature": 0,
    })
    assert isinstance(image_reply["choices"][0]["message"]["content"], str)
    assert isinstance(text_reply["choices"][0]["message"]["content"], str)

    n_image, top = _hf_first_token(out, [{"type": "image"}, {"type": "text", "text": question}],
                                   Image.open(image_path).convert("RGB"))
    n_text, _ = _hf_first_token(out, [{"type": "text", "text": "Say hello."}], None)
    assert image_reply["usage"]["prompt_tokens"] == n_image  # same chat template and <image> expansion
    assert text_reply["usage"]["prompt_tokens"] == n_text
    served_top = image_reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["token"] for t in served_top[:3]] == [token for token, _ in top[:3]]
    diff = max(abs(theirs["logprob"] - value) for theirs, (_, value) in zip(served_top, top))
    print(f"vLLM vs transformers, first-token top-5 logprobs: max |diff| {diff:.2e}")
    assert diff < 2e-3, (served_top, top)
