"""The Gradio web UI: images, microphone or audio file, typed text, chat history, switches.

The event handler takes the raw component payloads (``preprocess=False``) so that image and
audio files are checked by the same code as API uploads and every problem reaches the user
as a readable message in the status line, never a generic error box. Uploaded files are
only read from inside Gradio's upload folder. Each browser session keeps its own
conversation: images uploaded with a question stay part of it for the later turns (several
per turn, up to the server's ``--max-images`` in all); the answer streams into the chat as it
is generated.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from chat.assistant import GenerationSettings
from serve.engine import Engine
from serve.errors import ServeError, bad_request, too_large
from serve.inputs import Limits, decode_image, join_question
from serve.jobs import Job, Result
from serve.postprocess import Options as PostOptions
from serve.speech import Transcriber

log = logging.getLogger(__name__)

INTRO = (
    "Ask about an image, or just chat. Give a question by typing, recording or uploading audio "
    "(or both). With an image the fine-tuned model answers; without one, the base language model."
)


def _upload_bytes(payload, limits: Limits, what: str, param: str) -> bytes | None:
    """The bytes of a file the browser uploaded to Gradio; None when nothing was given."""
    if not payload:
        return None
    raw = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(raw, str) or not raw:
        raise bad_request(f"the {what} did not arrive; upload it again", param)
    root = Path(get_upload_folder()).resolve()
    path = Path(raw).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise bad_request(f"the {what} is not an upload from this page; upload it again", param)
    size = path.stat().st_size
    if size > limits.max_upload_bytes:
        raise too_large(
            f"the {what} is {size / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.1f} MB", param
        )
    return path.read_bytes()


def _gallery_files(payload) -> list:
    """The uploaded files of a Gallery payload (a list of ``{"image": FileData, "caption": ...}``)."""
    items = payload.get("root", []) if isinstance(payload, dict) else payload or []
    return [item.get("image", item) if isinstance(item, dict) else item for item in items]


def _count(n: int) -> str:
    return f"[{n} image{'s' if n != 1 else ''}]"


def build_ui(
    engine: Engine, transcriber: Transcriber | None, limits: Limits, title: str = "phiclip assistant",
    max_images: int = 8,
) -> gr.Blocks:
    def respond(
        text, gallery, audio, messages, images, display, refine, clean, punctuation, max_new, temperature, top_p,
        penalty,
    ):
        messages, images, display = list(messages or []), list(images or []), list(display or [])
        keep = gr.skip()
        try:
            pictures = []
            for i, upload in enumerate(_gallery_files(gallery)):
                data = _upload_bytes(upload, limits, "image", f"image {i + 1}")
                if data is not None:
                    pictures.append(decode_image(data, limits, f"image {i + 1}"))
            if len(images) + len(pictures) > max_images:
                raise bad_request(f"this conversation would hold {len(images) + len(pictures)} images; the limit is "
                                  f"{max_images}: start a new conversation")
            transcript = ""
            sound = _upload_bytes(audio, limits, "recording", "audio")
            if sound is not None:
                if transcriber is None:
                    raise bad_request("speech recognition is switched off on this server; type the question")
                yield keep, keep, keep, keep, keep, "Transcribing the recording ...", keep, keep, keep
                transcript = transcriber.transcribe(sound, param="audio").text
            question = join_question(text, transcript)
            if not question:
                raise bad_request("the question is empty: type or record a question")
            turn = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": question}]
            job = Job(  # earlier turns keep their images: the model sees the whole conversation
                messages=[*messages, {"role": "user", "content": turn}],
                images=[*images, *pictures],
                settings=GenerationSettings(
                    max_new_tokens=int(max_new),
                    temperature=float(temperature),
                    top_p=float(top_p),
                    repetition_penalty=float(penalty),
                ),
                refine=bool(refine),
                post=PostOptions(clean=bool(clean), drop_punctuation=bool(punctuation)),
            )
            shown = question if not transcript else f"{(text or '').strip()}\n(spoken) {transcript}".strip()
            if pictures:
                shown = f"{_count(len(pictures))} {shown}"
            display = [*display, {"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
            yield display, keep, keep, keep, transcript, "Waiting for the model ...", keep, keep, keep
            answer, draft, result = "", "", None
            for event in engine.events(job):
                if isinstance(event, Result):
                    result = event
                    continue
                if event.kind == "draft":
                    draft += event.text
                    display[-1] = {"role": "assistant", "content": f"*draft:* {draft}"}
                else:
                    answer += event.text
                    display[-1] = {"role": "assistant", "content": answer}
                yield display, keep, keep, keep, keep, "Answering ...", keep, keep, keep
            display[-1] = {"role": "assistant", "content": answer}
            messages = [*messages, {"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
            images = [*images, *pictures]
            status = _done(result) + (f" The conversation holds {_count(len(images))}." if images else "")
            yield display, messages, images, display, transcript, status, "", None, None
        except ServeError as err:
            yield keep, keep, keep, keep, keep, f"⚠️ {err.message}", keep, keep, keep
        except Exception:
            log.exception("web UI request failed")
            yield keep, keep, keep, keep, keep, "⚠️ internal error; the server logged it", keep, keep, keep

    def reset():
        return [], [], [], [], "", "New conversation.", "", None, None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        messages = gr.State([])
        images = gr.State([])  # the conversation's images so far, in order
        display = gr.State([])
        gr.Markdown(f"## {title}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                gallery = gr.Gallery(label=f"Images for this question (several allowed; up to {max_images} per "
                                     "conversation, kept for the later questions)", type="filepath",
                                     file_types=["image"], interactive=True, columns=3, height=220,
                                     elem_id="image-input")
                audio = gr.Audio(
                    label="Question by voice (record or upload)",
                    sources=["microphone", "upload"],
                    type="filepath",
                    elem_id="audio-input",
                )
                with gr.Accordion("Extra steps and generation settings", open=False):
                    refine = gr.Checkbox(label="Refine image answers with the base model", elem_id="refine")
                    clean = gr.Checkbox(label="Clean up answers (echoed question, repeats, spaces)", elem_id="clean")
                    punctuation = gr.Checkbox(label="Remove punctuation", elem_id="punctuation")
                    max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
                    penalty = gr.Slider(0.5, 2.0, value=1.0, step=0.05, label="Repetition penalty")
            with gr.Column(scale=2):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420)
                transcript = gr.Textbox(label="Transcript of the recording", interactive=False, elem_id="transcript")
                status = gr.Markdown("Ready.", elem_id="status")
                question = gr.Textbox(
                    label="Question", placeholder="Ask something, then press Enter or Send", elem_id="question"
                )
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    new = gr.Button("New conversation", elem_id="new-conversation")

        inputs = [
            question,
            gallery,
            audio,
            messages,
            images,
            display,
            refine,
            clean,
            punctuation,
            max_new,
            temperature,
            top_p,
            penalty,
        ]
        outputs = [chatbot, messages, images, display, transcript, status, question, audio, gallery]
        for trigger in (send.click, question.submit):
            trigger(
                respond,
                inputs,
                outputs,
                preprocess=False,
                concurrency_limit=engine.concurrency * engine.max_batch,  # the engine batches them
                concurrency_id="generate",
                show_progress="minimal",
                api_visibility="private",
            )
        new.click(
            reset,
            None,
            [chatbot, messages, images, display, transcript, status, question, audio, gallery],
            api_visibility="private",
        )
    return demo


def _done(result: Result | None) -> str:
    if result is None:
        return "Done."
    model = "fine-tuned model (image)" if result.route == "vision" else "base model (no image)"
    note = ", refined" if result.draft is not None else ""
    cut = " (stopped at the token limit)" if result.finish_reason == "length" else ""
    return f"Answered by the {model}{note} in {result.seconds:.1f} s{cut}."
