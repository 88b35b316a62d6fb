"""Each LM family and each tower through every road (tests/family_matrix.py): tiny random-init LMs wearing their
family's real chat template (tests/templates), towers as the Hub ships them (full two-tower checkpoints with their own
image processors), trained two steps with PhiClip's defaults, then loaded from the Hub files in a fresh Python, asked
through ``phiclip chat``'s engine and the HTTP API, and exported to Llava and vllm-lora. A road a cell cannot take is
refused by name before anything is written. The GGUF column runs in ``make test-gguf``."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from family_matrix import CELLS, LMS, REFUSED_TOWERS, refusal, render_tables
from helpers import make_toy_data, phiclip_logits, tiny_config, transformers_log, without_project, write_image
from PIL import Image
from tiny_models import build_family_runs, save_tiny_tower

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4
NEW_TOKENS = 6
IMAGE_QUESTION = "Is it bright?"
TEXT_QUESTION = "Say hello."
CELL_IDS = [f"{lm}-{tower}" for lm, tower in CELLS]


def _end_of_turn(template: str) -> str:
    return json.loads((ROOT / "tests" / "templates" / f"{template}.json").read_text())["end_of_turn"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smol_tokenizer_dir) -> dict[tuple[str, str], Path]:
    """Every cell trained two steps."""
    return build_family_runs(tmp_path_factory.mktemp("families"), CELLS, smol_tokenizer_dir)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return write_image(tmp_path_factory.mktemp("probe") / "probe.png", seed=7, size=48)


def _greedy(chat, messages: list[dict], image: Image.Image | None) -> list[int]:
    from chat.assistant import GenerationSettings

    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    return chat.complete([messages], [image], settings)[0].token_ids


# --- training ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_training_supervises_the_answers_with_the_lms_own_attention(runs, cell):
    from chat.assistant import VisionChat
    from data.records import Turn
    from data.template import IGNORE_INDEX, encode_conversation

    run = runs[cell]
    losses = [row["loss"] for row in json.loads((run / "log_history.json").read_text()) if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    chat = VisionChat.load(run)
    assert chat.model.language_model.get_base_model().config._attn_implementation == LMS[cell[0]].attention
    turns = [Turn("user", "<image>\nWhat is it?"), Turn("assistant", "A cat."), Turn("user", "Colour?"),
             Turn("assistant", "Grey.")]
    enc = encode_conversation(chat.processor, turns, n_image_tokens=chat.n_image_tokens, max_length=512)
    supervised = chat.tokenizer.decode([t for t, label in zip(enc.input_ids, enc.labels) if label != IGNORE_INDEX])
    end = _end_of_turn(cell[0])
    assert supervised == f"A cat.{end}Grey.{end}"
    if cell[0] in ("qwen3", "smollm3"):  # non-thinking mode: the empty think block belongs to the prompt
        prompt = chat.tokenizer.decode(chat.prompt_ids([{"role": "user", "content": "Hello?"}]))
        assert "<think>" in prompt and prompt.rstrip().endswith("</think>")


@pytest.mark.parametrize("tower", sorted(REFUSED_TOWERS))
def test_a_tower_phiclip_cannot_feed_is_refused_by_name(tmp_path, tiny_llama_dir, tower):
    from train.run import train

    folder = save_tiny_tower(tmp_path / tower, tower)
    cfg = tiny_config(tiny_llama_dir, folder, make_toy_data(tmp_path), tmp_path / "run", max_steps=1)
    cfg.model.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="NaFlex"):
        train(cfg)
    assert not list((tmp_path / "run").rglob("*"))  # nothing written


@pytest.mark.parametrize("cell", [("llama3", "siglip"), ("qwen3", "clip-full")], ids=["siglip", "clip"])
def test_a_two_tower_checkpoint_loads_its_vision_half_without_a_load_report(runs, cell):
    """Towers ship as two-tower checkpoints; the text half they leave unused is expected, not reported (before,
    every load printed transformers' table of the text tower's weights as UNEXPECTED)."""
    from chat.assistant import VisionChat

    with transformers_log("transformers.modeling_utils") as records:
        VisionChat.load(runs[cell])
    assert records and records[0].getMessage().startswith("probe")  # the hook sees the logger the report uses
    reported = [m for m in (r.getMessage() for r in records[1:]) if "LOAD REPORT" in m or "text_model" in m]
    assert reported == []


def test_a_tower_checkpoint_missing_a_weight_is_refused_naming_it(tmp_path, tiny_llama_dir):
    from safetensors.torch import load_file, save_file

    from train.run import train

    folder = save_tiny_tower(tmp_path / "clip", "clip")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["vision_model.post_layernorm.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = tiny_config(tiny_llama_dir, folder, make_toy_data(tmp_path), tmp_path / "run", max_steps=1)
    with pytest.raises(ValueError, match=r"vision tower .*lacks post_layernorm\.weight"):
        train(cfg)


# --- the Hub files, in a fresh Python without the project --------------------------------------------------------

HUB = """
import json, sys
import torch
from PIL import Image
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline)
cells, image_path, out = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
image = Image.open(image_path).convert("RGB")
results = {}
for name, (folder, lm_folder) in cells.items():
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    autos = (AutoModel, AutoModelForImageTextToText)
    got = {"classes": sorted({type(model).__name__}
                             | {type(auto.from_pretrained(folder, trust_remote_code=True)).__name__ for auto in autos})}
    for road, content in (("image", [{"type": "image", "image": image}, {"type": "text", "text": "%(image)s"}]),
                          ("text", [{"type": "text", "text": "%(text)s"}])):
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=%(n)d, do_sample=False)
        got[road] = ids[0, inputs["input_ids"].shape[1]:].tolist()
    # The text route is the base LM, adapter off: the LM checkpoint's own greedy answer.
    base = AutoModelForCausalLM.from_pretrained(lm_folder).eval()
    ids = base.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        max_new_tokens=%(n)d, do_sample=False)
    got["base_lm_text"] = ids[0, inputs["input_ids"].shape[1]:].tolist()
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    reply = pipe(images=image, text="%(image)s", generate_kwargs={"max_new_tokens": %(n)d}, return_full_text=False)
    got["pipeline"] = reply[0]["generated_text"]
    got["image_text"] = processor.decode(got["image"], skip_special_tokens=True)
    results[name] = got
json.dump(results, open(out, "w"))
""" % {"image": IMAGE_QUESTION, "text": TEXT_QUESTION, "n": NEW_TOKENS}


@pytest.fixture(scope="module")
def hub_answers(runs, probe, tmp_path_factory) -> dict[str, dict]:
    """One fresh Python loads every cell's Hub folder (as a Hub user, without the project importable)."""
    from chat.assistant import load_parts

    out = tmp_path_factory.mktemp("hub") / "answers.json"
    cells = {}
    for cell, run in runs.items():
        model, _ = load_parts(run, dtype=torch.float32, load_adapter=False)
        cells["-".join(cell)] = (str(run / "model"), model.config.text_model)
    script = without_project(ROOT) + HUB
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cells), str(probe), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=out.parent, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_hub_files_answer_as_the_projects_own_load(runs, hub_answers, probe, cell):
    from chat.assistant import VisionChat

    got = hub_answers["-".join(cell)]
    assert got["classes"] == ["PhiClipForCausalLM"]
    chat = VisionChat.load(runs[cell])
    image = Image.open(probe).convert("RGB")
    assert got["image"] == _greedy(chat, [{"role": "user", "content": IMAGE_QUESTION}], image)
    assert got["text"] == _greedy(chat, [{"role": "user", "content": TEXT_QUESTION}], None)
    assert got["text"] == got["base_lm_text"]
    assert got["pipeline"].strip() == got["image_text"].strip()


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_chat_and_api_answer_as_the_hub_load(runs, hub_answers, probe, cell):
    """``phiclip chat``'s engine and the OpenAI-style API give the Hub load's greedy answers, on both routes."""
    from live_server import LiveServer

    from chat.assistant import GenerationSettings, VisionChat
    from serve.config import ServeConfig
    from serve.server import build_app, load_engine, load_transcriber

    got = hub_answers["-".join(cell)]
    chat = VisionChat.load(runs[cell])
    image = Image.open(probe).convert("RGB")
    settings = GenerationSettings(max_new_tokens=NEW_TOKENS)
    image_answer = chat.answer([{"role": "user", "content": IMAGE_QUESTION}], image, settings)
    text_answer = chat.answer([{"role": "user", "content": TEXT_QUESTION}], None, settings)
    assert image_answer == chat.tokenizer.decode(got["image"], skip_special_tokens=True).strip()
    assert text_answer == chat.tokenizer.decode(got["text"], skip_special_tokens=True).strip()

    config = ServeConfig(ui=False, whisper_model=None)
    engine = load_engine(runs[cell], config)
    try:
        with LiveServer(build_app(engine, load_transcriber(config), config)) as live, \
                httpx.Client(base_url=live.url, timeout=120) as client:
            url = "data:image/png;base64," + base64.b64encode(probe.read_bytes()).decode()
            asked = {
                "image": [{"type": "text", "text": IMAGE_QUESTION}, {"type": "image_url", "image_url": {"url": url}}],
                "text": TEXT_QUESTION,
            }
            for road, content in asked.items():
                body = {"model": "phiclip", "messages": [{"role": "user", "content": content}],
                        "max_tokens": NEW_TOKENS}
                response = client.post("/v1/chat/completions", json=body)
                assert response.status_code == 200, response.text
                expected = image_answer if road == "image" else text_answer
                assert response.json()["choices"][0]["message"]["content"] == expected, road
    finally:
        engine.close()


# --- exports -----------------------------------------------------------------------------------------------------


def _llava_logits(model, processor, image, question: str, steps: int):
    """A Llava checkpoint's greedy continuation of ``steps`` tokens and its logits over prompt + continuation."""
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=[image] if image is not None else None, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        continuation = out[0, inputs["input_ids"].shape[1]:]
        full = {**inputs, "input_ids": out, "attention_mask": torch.ones_like(out)}
        return inputs["input_ids"][0].tolist(), continuation.tolist(), model(**full).logits[0]


def _assert_refused(cell, road: str, export, out: Path) -> bool:
    """True where the matrix says ``road`` refuses ``cell``: then the export raises naming the reason, writing
    nothing."""
    from export.checkpoint import ExportError

    reason = refusal(cell, road)
    if reason is None:
        return False
    with pytest.raises(ExportError, match=reason):
        export()
    assert not out.exists() and not list(out.parent.glob(out.name + "*"))
    return True


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_llava_export_gives_phiclips_logits_at_every_step(runs, probe, cell, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from chat.assistant import VisionChat
    from export.checkpoint import export_run

    out = tmp_path / "llava"
    if _assert_refused(cell, "llava", lambda: export_run(runs[cell], out), out):
        return
    export_run(runs[cell], out)
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    chat = VisionChat.load(runs[cell])
    image = Image.open(probe).convert("RGB")
    for picture, question in ((image, IMAGE_QUESTION), (None, TEXT_QUESTION)):
        prompt, continuation, theirs = _llava_logits(llava, processor, picture, question, NEW_TOKENS)
        ids, ours = phiclip_logits(chat, [{"role": "user", "content": question}], picture, True, continuation)
        assert prompt == ids[:len(prompt)]
        vocab = ours.shape[-1]  # the export gives <image> a vocabulary row of its own
        diff = (theirs[:, :vocab] - ours).abs().max().item()
        assert diff < ATOL, f"{question}: max |logit diff| {diff:.2e} over {len(continuation)} steps"


@pytest.mark.parametrize("cell", CELLS, ids=CELL_IDS)
def test_vllm_lora_export_names_map_onto_llava(runs, probe, cell, tmp_path):
    """The adapter loads with PEFT onto transformers' Llava (the names vLLM maps from) onto every module PhiClip
    trained, and the routes give PhiClip's logits: text on the base LM, image through the adapter."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from chat.assistant import VisionChat
    from export.vllm_lora import export_vllm_lora

    out = tmp_path / "vllm"
    if _assert_refused(cell, "vllm-lora", lambda: export_vllm_lora(runs[cell], out), out):
        return
    export_vllm_lora(runs[cell], out)
    with safe_open(str(runs[cell] / "model" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        trained = {k.rsplit(".lora_", 1)[0] for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    processor = AutoProcessor.from_pretrained(out)
    llava = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    chat = VisionChat.load(runs[cell])
    image = Image.open(probe).convert("RGB")
    _, continuation, text_logits = _llava_logits(llava, processor, None, TEXT_QUESTION, 2)
    _, want = phiclip_logits(chat, [{"role": "user", "content": TEXT_QUESTION}], None, False, continuation)
    assert (text_logits[:, :want.shape[-1]] - want).abs().max() < ATOL
    routed = PeftModel.from_pretrained(llava, str(out / "lora")).eval()
    wrapped = [n for n, m in routed.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert len(wrapped) == len(trained) and all(".language_model." in n for n in wrapped), wrapped[:3]
    _, continuation, image_logits = _llava_logits(routed, processor, image, IMAGE_QUESTION, 2)
    _, want = phiclip_logits(chat, [{"role": "user", "content": IMAGE_QUESTION}], image, True, continuation)
    assert (image_logits[:, :want.shape[-1]] - want).abs().max() < ATOL


def test_readme_tables_are_the_matrix():
    readme = (ROOT / "README.md").read_text()
    assert render_tables() in readme, "README's support tables differ from tests/family_matrix.py's"
