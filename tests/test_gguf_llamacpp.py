"""The GGUF export checked in llama.cpp itself (llama-cpp-python 0.3.36 in .venv-llama): ``make test-gguf``.

Tiny models (seconds) check files, prompts, image embeddings, answers and the two llama.cpp bugs
the mmproj works around (a tiny CLIP tower exported with ``allow_approximate_vision``; a tiny SigLIP
tower, exact); the trained demo (``runs/demo``, when present: a SigLIP tower with ``full``) checks
the floors: per-token cosine >= 0.999 between llama.cpp's image embeddings and PhiClip's on every
held-out image, exact match >= 0.90 (f16 and q8_0) on its held-out questions, >= 98 % agreement
with PhiClip's own greedy answers (f16), and the text-only route naming Paris.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from family_matrix import CELLS, refusal
from PIL import Image

from export import mmproj
from export.gguf import INFO_FILE, export_gguf, probe_picture
from export.gguf_lm import gguf_chat_template
from export.llamacpp import LlamaCppError, find_llamacpp


def _llama_or_none():
    try:
        return find_llamacpp()
    except LlamaCppError:
        return None


LLAMA = _llama_or_none()
pytestmark = [pytest.mark.gguf,
              pytest.mark.skipif(LLAMA is None,
                                 reason="no llama.cpp side environment (bash scripts/llamacpp_setup.sh)")]
DEMO = Path(os.environ.get("PHICLIP_DEMO_RUN", Path(__file__).resolve().parents[1] / "runs" / "demo"))
NO_REPACK = {"repack": False}  # quantized types on CPUs that advertise AMX but cannot run it (see the card)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _embed(lm: Path, projector: Path, image: Path, width: int, out: Path) -> np.ndarray:
    LLAMA.runner("embed", {"model": str(lm), "mmproj": str(projector), "image": str(image), "out": str(out),
                           "width": width})
    return np.load(out)


def _chat(lm: Path, projector: Path, items: list[dict], out: Path, max_tokens: int, **extra) -> dict[str, str]:
    requests = out.with_suffix(".requests.jsonl")
    requests.write_text("".join(json.dumps(item) + "\n" for item in items))
    LLAMA.runner("chat", {"model": str(lm), "mmproj": str(projector), "requests": str(requests), "out": str(out),
                          "max_tokens": max_tokens, "threads": 2, **extra})
    return {row["id"]: row["answer"] for row in map(json.loads, out.read_text().splitlines())}


def _load(folder: Path):
    from modeling_phiclip import PhiClipForCausalLM
    from processing_phiclip import PhiClipProcessor

    model = PhiClipForCausalLM.from_pretrained(folder, dtype=torch.float32, merge_adapter=True).eval()
    return model, PhiClipProcessor.from_pretrained(folder)


# ---- tiny models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_export(tiny_run, tmp_path_factory) -> Path:
    """The tiny CLIP run (strategy 'default'), exported without its class token: llama.cpp's approximate case."""
    return export_gguf(tiny_run, tmp_path_factory.mktemp("gguf") / "clip", quants=["q8_0"], name="tiny",
                       allow_approximate_vision=True)


@pytest.fixture(scope="module")
def clip_model(tiny_run):
    return _load(tiny_run / "model")


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A tiny PhiClip with a SigLIP tower (no class token) and strategy 'full': llama.cpp's exact case."""
    from helpers import make_toy_data, tiny_config
    from transformers import SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

    from train.run import train

    root = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(
        root / "tower")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "tower")
    cfg = tiny_config(tiny_llama_dir, root / "tower", make_toy_data(root), root / "run",
                      learning_rate=5e-2, projector_learning_rate=5e-2)
    cfg.model.vision_feature_select_strategy = "full"
    return train(cfg)


@pytest.fixture(scope="module")
def siglip_export(siglip_run, tmp_path_factory) -> Path:
    return export_gguf(siglip_run, tmp_path_factory.mktemp("gguf") / "siglip", name="sig", text_route=False)


def test_lm_gguf_is_the_merged_lm_with_phiclips_chat_template(clip_export, clip_model, tiny_run):
    from gguf import GGUFReader

    from modeling_phiclip import PhiClipForCausalLM

    model, processor = clip_model
    reader = GGUFReader(str(clip_export / "tiny-f16.gguf"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["tokenizer.chat_template"] == gguf_chat_template(processor.chat_template)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    tensor = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight")
    stored = np.array(tensor.data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    merged = model.language_model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    base = PhiClipForCausalLM.from_pretrained(tiny_run / "model", dtype=torch.float32, load_adapter=False)
    before = base.language_model.model.layers[0].self_attn.v_proj.weight.detach().numpy()
    np.testing.assert_allclose(stored, merged, atol=2e-3, rtol=2e-3)
    assert np.abs(merged - before).max() > 50 * np.abs(stored - merged).max()  # the LoRA update is in the file
    quantized = GGUFReader(str(clip_export / "tiny-Q8_0.gguf"))
    assert quantized.fields["general.file_type"].contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    info = json.loads((clip_export / INFO_FILE).read_text())
    assert info["llama_cpp_python"] == "0.3.36" and info["vision_exact"] is False


def test_a_plain_mtmd_chat_handler_feeds_llamacpp_phiclips_prompt(clip_export, clip_model, tmp_path):
    """Llama(chat_handler=MTMDChatHandler(...)) with the embedded template: the same tokens, image at the same place."""
    _, processor = clip_model
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    probe_picture(32, 32).save(first)
    probe_picture(48, 48).save(second)
    n_tokens = 16
    conversations = [
        [{"role": "user", "content": [{"type": "image", "path": first}, {"type": "text", "text": "Is it bright?"}]}],
        [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi! How can I help?"},
         {"role": "user", "content": [{"type": "image", "path": second}, {"type": "text", "text": "Colour?"}]},
         {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And the shape?"}],
    ]
    for messages in conversations:
        sent = [dict(m, content=[{"type": "image_path", "path": str(p["path"])} if p["type"] == "image" else p
                                 for p in m["content"]]) if isinstance(m["content"], list) else m for m in messages]
        seen = LLAMA.runner("tokens", {"model": str(clip_export / "tiny-f16.gguf"),
                                       "mmproj": str(clip_export / "mmproj-tiny-f16.gguf"), "messages": sent})
        ids, _, _ = processor.encode_chat([dict(m, content=[{"type": "image"} if p["type"] == "image" else p
                                                            for p in m["content"]]) if isinstance(m["content"], list)
                                           else m for m in messages], add_generation_prompt=True)
        expected = []
        for token in ids:
            expected.extend([{"image": n_tokens}] if token == processor.image_token_id else [int(token)])
        assert seen["sequence"] == expected


@pytest.mark.parametrize("shape", ["string", "typed"])
def test_llama_servers_own_template_engine_places_markers_as_phiclip(clip_export, clip_model, tmp_path, shape):
    """llama-server renders with llama.cpp's Jinja engine; a media message arrives as "<marker>text" or typed parts."""
    from gguf import GGUFReader

    _, processor = clip_model
    marker = "<__media_q1w2e3__>"  # llama-server's markers are random
    template = GGUFReader(str(clip_export / "tiny-f16.gguf")).fields["tokenizer.chat_template"].contents()
    (tmp_path / "t.jinja").write_text(template)
    first = (f"{marker}{marker}Same colour?" if shape == "string" else
             [{"type": "media_marker", "text": marker}, {"type": "media_marker", "text": marker},
              {"type": "text", "text": "Same colour?"}])
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": first}]
    (tmp_path / "in.json").write_text(json.dumps({"messages": messages, "add_generation_prompt": True,
                                                  "bos_token": processor.tokenizer.bos_token,
                                                  "eos_token": processor.tokenizer.eos_token}))
    done = subprocess.run([str(LLAMA.src / "llamacpp-jinja-render"), str(tmp_path / "t.jinja"),
                           str(tmp_path / "in.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    expected = processor.render([*messages[:2], {"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same colour?"}]}], add_generation_prompt=True)
    assert done.stdout == expected.replace("<image>", marker)


def test_siglip_full_image_embeddings_match_phiclip_exactly(siglip_export, siglip_run, tmp_path):
    model, processor = _load(siglip_run / "model")
    for size in (32, 64):
        picture = probe_picture(size, size)
        picture.save(tmp_path / "p.png")
        theirs = _embed(siglip_export / "sig-f16.gguf", siglip_export / "mmproj-sig-f16.gguf", tmp_path / "p.png",
                        model.config.text_config.hidden_size, tmp_path / "e.npy")
        with torch.no_grad():
            ours = model.get_image_features(processor.image_pixels([picture]))[0].numpy()
        assert theirs.shape == ours.shape == (16, model.config.text_config.hidden_size)
        assert _cos(theirs, ours).min() >= 0.999
    info = json.loads((siglip_export / INFO_FILE).read_text())
    assert info["vision_exact"] is True and info["vision_cosine_min"]["square"] >= 0.999


def test_clip_default_image_embeddings_are_close_without_the_class_token(clip_export, clip_model, tmp_path):
    model, processor = clip_model
    picture = probe_picture(64, 64)
    picture.save(tmp_path / "p.png")
    theirs = _embed(clip_export / "tiny-f16.gguf", clip_export / "mmproj-tiny-f16.gguf", tmp_path / "p.png",
                    model.config.text_config.hidden_size, tmp_path / "e.npy")
    with torch.no_grad():
        ours = model.get_image_features(processor.image_pixels([picture]))[0].numpy()
    cosine = _cos(theirs, ours)
    print(f"tiny CLIP, class token left out: per-token cosine min {cosine.min():.5f} mean {cosine.mean():.5f}")
    assert cosine.min() >= 0.99
    info = json.loads((clip_export / INFO_FILE).read_text())
    assert info["vision_exact"] is False and info["approximate_vision_allowed"] is True
    recorded = info["vision_cosine_min"]["square"]  # the export's own check, on the same picture
    assert recorded == pytest.approx(float(cosine.min()), abs=1e-5)
    card = (clip_export / "README.md").read_text()
    assert "--allow-approximate-vision" in card and f"{recorded:.5f}" in card


def _class_token_features(model, processor, picture):
    """Projected hidden states with the class token: rows [CLS, p1 .. pN]."""
    with torch.no_grad():
        out = model.vision_tower(pixel_values=processor.image_pixels([picture]), output_hidden_states=True)
        return model.projector(out.hidden_states[model.config.vision_feature_layer])[0].numpy()


def _kept_class_token_mmproj(model, processor, path: Path, rotate: bool, monkeypatch) -> Path:
    monkeypatch.setattr(mmproj, "ROTATE_POSITIONS", rotate)
    plan = mmproj.plan_vision(model.config, allow_approximate=True)
    kept = mmproj.VisionPlan(plan.layers, plan.order, True, True, "class token kept")
    return mmproj.write_mmproj(model, processor.image_processor, path, name="t", plan=kept, llama_cpp_version="")


def test_llamacpp_class_token_row_bug_still_present(clip_export, clip_model, tmp_path, monkeypatch):
    """llama.cpp 0.3.36 keeps rows 1..N of [p1..pN, CLS]: patch 1 dropped, CLS kept (tools/mtmd/models/llava.cpp,
    clip.cpp ``patches[i] = i + patch_offset``). When this fails, llama.cpp emits PhiClip's rows: set
    ``CLASS_TOKEN_APPROXIMATED = False`` in export/mmproj.py so the class token goes back into the mmproj."""
    model, processor = clip_model
    picture = probe_picture(32, 32)
    picture.save(tmp_path / "p.png")
    projector = _kept_class_token_mmproj(model, processor, tmp_path / "kept.gguf", True, monkeypatch)
    theirs = _embed(clip_export / "tiny-f16.gguf", projector, tmp_path / "p.png",
                    model.config.text_config.hidden_size, tmp_path / "e.npy")
    full = _class_token_features(model, processor, picture)
    assert _cos(theirs, np.concatenate([full[2:], full[:1]])).min() >= 0.9999  # [p2 .. pN, CLS]
    assert _cos(theirs, full[1:]).min() < 0.9  # not PhiClip's [p1 .. pN]


def test_llamacpp_position_order_bug_still_present(clip_export, clip_model, tmp_path, monkeypatch):
    """llama.cpp 0.3.36 appends the class token but takes position rows CLS-first; the mmproj rotates the rows.
    When this fails, llama.cpp assigns positions correctly: set ``ROTATE_POSITIONS = False`` in export/mmproj.py."""
    model, processor = clip_model
    picture = probe_picture(32, 32)
    picture.save(tmp_path / "p.png")
    full = _class_token_features(model, processor, picture)
    shifted = np.concatenate([full[2:], full[:1]])
    width = model.config.text_config.hidden_size
    rotated = _embed(clip_export / "tiny-f16.gguf",
                     _kept_class_token_mmproj(model, processor, tmp_path / "r.gguf", True, monkeypatch),
                     tmp_path / "p.png", width, tmp_path / "r.npy")
    as_is = _embed(clip_export / "tiny-f16.gguf",
                   _kept_class_token_mmproj(model, processor, tmp_path / "n.gguf", False, monkeypatch),
                   tmp_path / "p.png", width, tmp_path / "n.npy")
    assert _cos(rotated, shifted).min() >= 0.9999
    assert _cos(as_is, shifted).min() < 0.999


def _phiclip_answers(run: Path, items: list[dict], max_new_tokens: int) -> dict[str, str]:
    from chat.assistant import GenerationSettings, VisionChat

    chat = VisionChat.load(run)
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    return {item["id"]: chat.answer([{"role": "user", "content": item["question"]}], item["image"], settings)
            for item in items}


def _tiny_items(folder: Path, n: int = 6) -> list[dict]:
    items = []
    for i in range(n):
        path = folder / f"q{i}.png"
        Image.fromarray(np.random.default_rng(100 + i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
        items.append({"id": f"q{i}", "image": str(path), "question": "Is it bright?"})
    return items


def test_greedy_answers_agree_with_phiclip_in_llamacpp(siglip_export, siglip_run, tmp_path):
    items = _tiny_items(tmp_path)
    ours = _phiclip_answers(siglip_run, items, 12)
    f16 = _chat(siglip_export / "sig-f16.gguf", siglip_export / "mmproj-sig-f16.gguf", items, tmp_path / "f16.jsonl",
                12)
    same = sum(f16[k].strip() == ours[k].strip() for k in ours)
    print(f"tiny SigLIP PhiClip vs llama.cpp f16: {same}/{len(ours)} identical greedy answers")
    assert same >= len(ours) - 1


def test_quantized_file_answers_with_repacking_off(clip_export, tmp_path):
    items = _tiny_items(tmp_path, 2)
    answers = _chat(clip_export / "tiny-Q8_0.gguf", clip_export / "mmproj-tiny-f16.gguf", items,
                    tmp_path / "q8.jsonl", 8, **NO_REPACK)
    assert set(answers) == {"q0", "q1"} and all(isinstance(a, str) and a for a in answers.values())


def test_text_only_route_base_lm_and_adapter(clip_export, tiny_run):
    """Base GGUF alone answers as PhiClip's text-only route; base + LoRA GGUF answers as the merged file."""
    from chat.assistant import GenerationSettings, VisionChat

    question = [{"role": "user", "content": "Hi"}]
    text_only = VisionChat.load(tiny_run).answer(question, None, GenerationSettings(max_new_tokens=8))
    base = LLAMA.runner("complete", {"model": str(clip_export / "text-only/tiny-base-f16.gguf"),
                                     "messages": question, "max_tokens": 8})["answer"]
    adapted = LLAMA.runner("complete", {"model": str(clip_export / "text-only/tiny-base-f16.gguf"),
                                        "lora": str(clip_export / "text-only/tiny-lora-f16.gguf"),
                                        "messages": question, "max_tokens": 8})["answer"]
    merged = LLAMA.runner("complete", {"model": str(clip_export / "tiny-f16.gguf"), "messages": question,
                                       "max_tokens": 8})["answer"]
    assert base.strip() == text_only.strip()
    assert adapted.strip() == merged.strip()
    assert base.strip() != merged.strip()  # the adapter changes the answer, so the two checks above mean something


@pytest.fixture(scope="module")
def smollm2_export(tmp_path_factory) -> tuple[Path, Path]:
    """A PhiClip on the real SmolLM2-135M-Instruct (offline copy), trained one step, exported with its text route."""
    from tiny_models import build_tiny_run, save_tiny_clip

    from runtime.models import SMOLLM2, resolve

    root = tmp_path_factory.mktemp("smollm2")
    run = build_tiny_run(root, resolve(f"offline:{SMOLLM2}"), save_tiny_clip(root / "clip"), steps=1)
    return run, export_gguf(run, root / "gguf", name="smol", allow_approximate_vision=True)


def test_text_only_route_names_paris_with_a_real_lm(smollm2_export):
    from chat.assistant import GenerationSettings, VisionChat

    run, folder = smollm2_export
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ours = VisionChat.load(run).answer(question, None, GenerationSettings(max_new_tokens=32))
    base = LLAMA.runner("complete", {"model": str(folder / "text-only/smol-base-f16.gguf"), "messages": question,
                                     "max_tokens": 32, "threads": 2})["answer"]
    assert "Paris" in base
    assert base.strip() == ours.strip()


# ---- the trained demo ----------------------------------------------------------------------------


needs_demo = pytest.mark.skipif(not (DEMO / "answers.jsonl").is_file(),
                                reason=f"no trained demo run at {DEMO} (run `make demo` first)")


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    return export_gguf(DEMO, tmp_path_factory.mktemp("demo-gguf") / "demo", quants=["q8_0"], name="demo")


@pytest.fixture(scope="module")
def demo_items() -> list[dict]:
    rows = [json.loads(line) for line in (DEMO / "answers.jsonl").read_text().splitlines()]
    return [{"id": str(i), "image": row["image"], "question": row["question"].replace("<image>", "").strip(),
             "answer": row["answer"], "references": row["references"]} for i, row in enumerate(rows) if row["image"]]


@needs_demo
def test_demo_image_embeddings_match_phiclip_on_every_held_out_image(demo_export, demo_items, tmp_path):
    """The demo's SigLIP tower with 'full' is exact in llama.cpp: cosine >= 0.999 for every token of every image."""
    model, processor = _load(DEMO / "model")
    info = json.loads((demo_export / INFO_FILE).read_text())
    assert info["vision_exact"] is True and info["approximate_vision_allowed"] is False
    assert info["pad_colour"] == info["llama_cpp_pad_colour"] == list(mmproj.LLAMACPP_PAD_COLOUR)
    images = sorted({item["image"] for item in demo_items})
    width = model.config.text_config.hidden_size
    cosines = []
    for i, image in enumerate(images):
        theirs = _embed(demo_export / "demo-f16.gguf", demo_export / "mmproj-demo-f16.gguf", Path(image), width,
                        tmp_path / f"e{i}.npy")
        with torch.no_grad():
            ours = model.get_image_features(processor.image_pixels([image]))[0].numpy()
        assert theirs.shape == ours.shape == (16, width), image
        cosines.append(_cos(theirs, ours))
    cosine = np.concatenate(cosines)
    print(f"demo in llama.cpp: per-token cosine vs PhiClip on {len(images)} held-out images: "
          f"min {cosine.min():.7f}, mean {cosine.mean():.7f}")
    assert len(images) >= 50
    assert cosine.min() >= 0.999


@needs_demo
@pytest.mark.parametrize("quant", ["f16", "Q8_0"])
def test_demo_in_llamacpp_keeps_its_floors(demo_export, demo_items, quant, tmp_path):
    from evaluation.metrics import exact_match

    extra = NO_REPACK if quant != "f16" else {}
    answers = _chat(demo_export / f"demo-{quant}.gguf", demo_export / "mmproj-demo-f16.gguf", demo_items,
                    tmp_path / "answers.jsonl", 24, **extra)
    scores = [exact_match(answers[item["id"]], item["references"]) for item in demo_items]
    agree = [answers[item["id"]].strip() == item["answer"].strip() for item in demo_items]
    print(f"demo {quant} in llama.cpp: exact match {np.mean(scores):.3f}, agreement with PhiClip "
          f"{sum(agree)}/{len(agree)} on {len(demo_items)} held-out questions")
    assert len(demo_items) >= 200
    assert np.mean(scores) >= 0.90
    if quant == "f16":
        assert np.mean(agree) >= 0.98


@needs_demo
def test_demo_text_only_route_names_paris(demo_export):
    answer = LLAMA.runner("complete", {"model": str(demo_export / "text-only/demo-base-f16.gguf"), "max_tokens": 32,
                                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert "Paris" in answer["answer"]


def test_push_gguf_uploads_the_export_in_one_commit(clip_export, tmp_path):
    from hub_server import LocalHub, hub_env

    repo = "local-user/tiny-GGUF"
    with LocalHub() as hub:
        env = hub_env(hub.url, tmp_path / "hf-home")
        pushed = subprocess.run([sys.executable, "-m", "phiclip_cli", "push", str(clip_export), repo, "--gguf"],
                                env=env, capture_output=True, text=True, timeout=300,
                                cwd=Path(__file__).resolve().parents[1])
        assert pushed.returncode == 0, pushed.stderr[-3000:] + "\n".join(hub.unknown_requests())
        assert len(hub.commits(repo)) == 2  # the repository's initial commit, then ours
        files = hub.files(repo)
    local = {p.relative_to(clip_export).as_posix() for p in clip_export.rglob("*") if p.is_file()}
    assert set(files) - {".gitattributes"} == local
    assert files["tiny-Q8_0.gguf"] == (clip_export / "tiny-Q8_0.gguf").read_bytes()
    card = files["README.md"].decode()
    assert f"llama-server -hf {repo}:Q8_0" in card and "OWNER/" not in card
    assert json.loads(files[INFO_FILE])["repo_id"] == repo


@needs_demo
def test_demo_two_image_questions_in_llamacpp(demo_export, tmp_path):
    """Several images in one message: llama.cpp's exact match on the demo's two-image task stays PhiClip's."""
    from data.sources import read_records
    from evaluation.metrics import exact_match
    from runtime.config import load_config

    pairs = json.loads((DEMO / "eval.json").read_text())["two_image"]
    records, _ = read_records(pairs["data"])
    images = Path(load_config(DEMO / "config.yaml").data.images)
    items = [{"id": str(i), "image": [str(images / name) for name in r.images],
              "question": r.turns[0].content.replace("<image>", "").strip(), "references": [r.turns[1].content]}
             for i, r in enumerate(records)]
    answers = _chat(demo_export / "demo-f16.gguf", demo_export / "mmproj-demo-f16.gguf", items,
                    tmp_path / "pairs.jsonl", 24)
    score = np.mean([exact_match(answers[item["id"]], item["references"]) for item in items])
    print(f"demo two-image questions, llama.cpp f16: exact match {score:.3f} on {len(items)} "
          f"(PhiClip {pairs['exact_match']:.3f})")
    assert score >= pairs["exact_match"] - 0.05


@needs_demo
def test_gguf_benchmark_small_runs_and_prints_its_ratio():
    """benchmarks/gguf.py in its small mode: the demo exported now, PhiClip and llama.cpp timed, the closing line."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "gguf.py"), "--run", str(DEMO), "--small"],
                         capture_output=True, text=True, cwd=root, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert re.search(r"^llama\.cpp q4_k_m\s", out.stdout, re.M)
    assert re.fullmatch(r"llama\.cpp q8_0 decode vs PhiClip: [0-9.]+x", out.stdout.strip().splitlines()[-1])


def test_phi3_with_its_sentencepiece_tokenizer_converts_and_quantizes(tmp_path):
    """benchmarks/real_shape.py's GGUF stage at toy sizes: a Phi-3 LM whose tokenizer is a SentencePiece model
    (as Phi-3.5-mini's is). transformers 5 saves only tokenizer.json, and llama.cpp's Phi-3 converter reads
    tokenizer.model: the saved PhiClip folder and the converter's input keep it. The CLIP ``default`` tower is
    refused before anything is written, and exported approximately when allowed."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "real_shape.py"), "--small", "--work",
                          str(tmp_path), "--stages", "build,train,gguf"],
                         capture_output=True, text=True, cwd=root, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert (tmp_path / "run" / "model" / "tokenizer.model").is_file()
    result = json.loads((tmp_path / "results" / "gguf.json").read_text())
    assert "vision_feature_select_strategy 'default'" in result["refusal"] and result["nothing_written_on_refusal"]
    assert {"real-shape-f16.gguf", "real-shape-Q4_K_M.gguf", "mmproj-real-shape-f16.gguf"} <= set(result["files"])
    assert min(result["vision_cosine_min"].values()) > 0.9
    assert out.stdout.strip().splitlines()[-1] == "real shape (small): 3/3 stages done"


# ---- each LM family (tests/family_matrix.py's GGUF column) -----------------------------------------------------


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, smol_tokenizer_dir) -> dict[tuple[str, str], Path]:
    from tiny_models import build_family_runs

    return build_family_runs(tmp_path_factory.mktemp("families"), CELLS, smol_tokenizer_dir)


@pytest.mark.parametrize("cell", CELLS, ids=lambda cell: "-".join(cell))
def test_each_family_converts_or_is_refused_by_name(family_runs, cell, tmp_path):
    """llama.cpp's own converter writes the LM with the family's template embedded; llama.cpp then answers the
    held-out questions as PhiClip does. What it cannot convert is refused naming the LM and the reason, and nothing
    is left at the export's folder."""
    run, out = family_runs[cell], tmp_path / "gguf"
    reason = refusal(cell, "gguf")
    if reason is not None:
        with pytest.raises(mmproj.GGUFExportError, match=re.escape(reason)):
            export_gguf(run, out, name="fam", text_route=False, llama=LLAMA)
        assert not out.exists() and not (tmp_path / "gguf.partial").exists()
        return
    export_gguf(run, out, name="fam", text_route=False, llama=LLAMA)
    items = _tiny_items(tmp_path, 4)
    ours = _phiclip_answers(run, items, 8)
    theirs = _chat(out / "fam-f16.gguf", out / "mmproj-fam-f16.gguf", items, tmp_path / "f16.jsonl", 8)
    same = sum(theirs[k].strip() == ours[k].strip() for k in ours)
    print(f"{cell}: PhiClip vs llama.cpp f16: {same}/{len(ours)} identical greedy answers")
    print({k: (ours[k], theirs[k]) for k in ours if ours[k].strip() != theirs[k].strip()})
    assert same >= len(ours) - 1
