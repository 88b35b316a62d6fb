"""Serve exports with vLLM's CPU build: the merged Llava export, and the vllm-lora export's two routes.

Needs the vLLM venv that ``scripts/vllm_setup.sh`` makes (``.venv-vllm``, or ``VLLM_VENV``);
skipped without it. Exports the demo run (``runs/demo``, or the run ``PHICLIP_DEMO_RUN`` names)
when it is trained, else a tiny run whose LM has a head size vLLM's CPU attention supports (32;
the shared tiny LM's 16 is not). Each test starts its own server and stops it (its process group)
before the next one starts. Startup takes minutes (torch.compile warm-up): deselect with
``-m "not vllm"``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import make_toy_data, tiny_config, tokenizer_with_template, write_image
from PIL import Image

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
DEMO = Path(os.environ.get("PHICLIP_DEMO_RUN", ROOT / "runs" / "demo"))
STARTUP_S = 900
LOGPROB_TOL = 2e-3  # float32 on both sides
if not (VENV / "bin" / "python").is_file():
    pytest.skip(f"vLLM is not installed (no {VENV}; run scripts/vllm_setup.sh)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


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
    # A high learning rate, so that the adapter visibly moves the answers (the routes differ).
    cfg = tiny_config(lm, clip_dir, make_toy_data(root), root / "run", max_steps=2,
                      learning_rate=5e-2, projector_learning_rate=5e-2)
    # The demo's settings: last-layer features with the CLS token, and a system prompt.
    cfg.model.vision_feature_layer = -1
    cfg.model.vision_feature_select_strategy = "full"
    cfg.data.system_prompt = "You answer questions about images."
    return train(cfg)


def _is_demo(run: Path) -> bool:
    return run == DEMO


@pytest.fixture(scope="module")
def phiclip_run(tmp_path_factory, smol_tokenizer_dir, tiny_clip_dir) -> Path:
    """The trained demo run when there is one, else a tiny run made for vLLM."""
    if (DEMO / "model" / "projector.safetensors").is_file():
        return DEMO
    root = tmp_path_factory.mktemp("vllm-run")
    return _vllm_ready_run(root, smol_tokenizer_dir, tiny_clip_dir)


@contextlib.contextmanager
def _vllm(export: Path, log: Path, max_model_len: int) -> Iterator[str]:
    """``scripts/vllm_serve.sh EXPORT`` in float32 on a free port; yields its base URL, then stops its process group."""
    port = _free_port()
    # float32 for the logit comparisons (vLLM's CPU default for "auto" is bfloat16).
    env = dict(os.environ, PORT=str(port), VLLM_CPU_KVCACHE_SPACE="1", VLLM_DTYPE="float32",
               VLLM_MAX_MODEL_LEN=str(max_model_len), VLLM_VENV=str(VENV))
    env.pop("SERVED_NAME", None)
    with log.open("w") as sink:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "vllm_serve.sh"), str(export)], cwd=ROOT, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                _get(base + "/health")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM not ready after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _probe(run: Path, side: int, folder: Path) -> tuple[Path, str]:
    """An image already at the tower's size (no resampling, so vLLM's torchvision and PhiClip's PIL
    image processors see identical pixels) and a question about it: a demo scene for the demo."""
    if _is_demo(run):
        import numpy as np

        from offline.shapes import render_scene, sample_scene

        render_scene(sample_scene(np.random.default_rng(5)), image_size=side).save(folder / "probe.png")
        return folder / "probe.png", "What color is the shape?"
    return write_image(folder / "probe.png", seed=11, size=side), "What colour is the shape?"


def _data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


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


def test_vllm_serves_export(phiclip_run, tmp_path):
    """The merged Llava export: vLLM's prompt and first-token logprobs equal transformers' on the same folder."""
    from export.checkpoint import export_run

    out = export_run(phiclip_run, tmp_path / "export", dtype="float32")
    side = json.loads((out / "config.json").read_text())["vision_config"]["image_size"]
    image_path, question = _probe(phiclip_run, side, tmp_path)
    with _vllm(out, tmp_path / "vllm.log", 2048 if _is_demo(phiclip_run) else 512) as base:
        image_reply = _post(base + "/v1/chat/completions", {
            "model": "export",
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": _data_url(image_path)}},
                {"type": "text", "text": question}]}],
            "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 5,
        })
        text_reply = _post(base + "/v1/chat/completions", {
            "model": "export", "messages": [{"role": "user", "content": "Say hello."}],
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
    assert diff < LOGPROB_TOL, (served_top, top)


def _first_top(completion) -> list[float]:
    """PhiClip's top-5 logprobs at the first answer token."""
    return [value for _, value in completion.logprobs[0].top]


def test_vllm_lora_routes_match_phiclip(phiclip_run, tmp_path):
    """The vllm-lora export: NAME-image (adapter) answers as PhiClip's image route, NAME-text (base LM) as its
    text-only route, both in one server and one batch; the same image sent to NAME-text is answered without
    the adapter, so the adapter demonstrably applies per request."""
    from chat.assistant import GenerationSettings, VisionChat
    from export.vllm_lora import export_vllm_lora

    demo = _is_demo(phiclip_run)
    out = export_vllm_lora(phiclip_run, tmp_path / "export", dtype="float32", name="phiclip")
    side = json.loads((out / "config.json").read_text())["vision_config"]["image_size"]
    image_path, question = _probe(phiclip_run, side, tmp_path)
    text_question = "What is the capital of France?" if demo else "Say hello."
    n_new = 24 if demo else 6

    chat = VisionChat.load(phiclip_run)
    settings = GenerationSettings(max_new_tokens=n_new, logprobs=True, top_logprobs=5)
    image = Image.open(image_path).convert("RGB")
    image_messages = [{"role": "user", "content": question}]
    text_messages = [{"role": "user", "content": text_question}]
    want_image = chat.complete([image_messages], [image], settings)[0]
    want_text = chat.complete([text_messages], [None], settings)[0]  # the base LM: PhiClip's text-only route
    with chat.model.adapter_disabled():
        want_image_base = chat.complete([image_messages], [image], settings)[0]
    token = chat.processor.image_token_id
    expand = lambda ids: [t for i in ids for t in [i] * (chat.n_image_tokens if i == token else 1)]  # noqa: E731
    want_prompt = {"image": expand(chat.prompt_ids(image_messages, n_images=1)),
                   "text": chat.prompt_ids(text_messages)}
    del chat

    def ask(model: str, with_image: bool) -> dict:
        content = [{"type": "text", "text": text_question}]
        if with_image:
            content = [{"type": "image_url", "image_url": {"url": _data_url(image_path)}},
                       {"type": "text", "text": question}]
        return _post(base + "/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": n_new,
            "temperature": 0, "logprobs": True, "top_logprobs": 5, "return_token_ids": True,
        })

    with _vllm(out, tmp_path / "vllm.log", 2048 if demo else 512) as base:
        served = {m["id"] for m in json.loads(_get(base + "/v1/models"))["data"]}
        with ThreadPoolExecutor(3) as pool:  # concurrent: vLLM batches adapter and base-model rows together
            jobs = {"image": pool.submit(ask, "phiclip-image", True), "text": pool.submit(ask, "phiclip-text", False),
                    "image_base": pool.submit(ask, "phiclip-text", True)}
            replies = {name: job.result() for name, job in jobs.items()}
    assert served == {"phiclip-image", "phiclip-text"}

    wants = {"image": want_image, "text": want_text, "image_base": want_image_base}
    for name, reply in replies.items():
        choice = reply["choices"][0]
        want = wants[name]
        print(f"{name}: vLLM {choice['message']['content']!r} / PhiClip {want.text!r}")
        assert reply["prompt_token_ids"] == want_prompt["text" if name == "text" else "image"], name
        assert choice["token_ids"] == want.token_ids, (name, choice["token_ids"], want.token_ids)
        assert choice["message"]["content"].strip() == want.text, name
        served_top = [t["logprob"] for t in choice["logprobs"]["content"][0]["top_logprobs"]]
        diff = max(abs(a - b) for a, b in zip(served_top, _first_top(want)))
        print(f"{name}: first-token top-5 logprobs, vLLM vs PhiClip: max |diff| {diff:.2e}")
        assert diff < LOGPROB_TOL, (name, served_top, _first_top(want))
    # The comparison can fail: with and without the adapter, PhiClip's image answers differ.
    moved = max(abs(a - b) for a, b in zip(_first_top(want_image), _first_top(want_image_base)))
    assert want_image.token_ids != want_image_base.token_ids or moved > 10 * LOGPROB_TOL, moved
