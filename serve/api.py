"""The HTTP API: OpenAI-compatible chat completions and transcriptions, plus ``/health``.

Handlers only read and check requests and wait: decoding images and audio runs in the
thread pool, generation in the engine's workers, so ``/health`` answers while answers are
being generated. Every error is JSON in OpenAI's shape, ``{"error": {"message", "type",
"param", "code"}}``, with a 4xx status for a bad request; unexpected failures are logged and
answered with a plain 500, never a stack trace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    StreamingResponse,
)
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import ClientDisconnect

from chat.assistant import TokenLogprob
from serve.auth import ApiKeyMiddleware
from serve.engine import Engine
from serve.errors import ServeError, bad_request, too_large, unsupported
from serve.inputs import Limits
from serve.jobs import Event, Job, Result
from serve.schema import ChatRequest, model_not_found, parse_chat, parse_json
from serve.speech import Transcriber

log = logging.getLogger(__name__)

WHISPER_ALIASES = ("whisper-1",)


def create_app(
    engine: Engine,
    transcriber: Transcriber | None,
    limits: Limits,
    ui_path: str | None = "/ui",
    api_key: str | None = None,
) -> FastAPI:
    """The API app; with ``api_key`` every route but ``/health``, ``/`` and the UI's wants that key."""
    app = FastAPI(title="phiclip serve", version="1", docs_url="/docs", redoc_url=None)
    app.state.engine = engine
    if api_key:
        app.add_middleware(
            ApiKeyMiddleware,
            key=api_key,
            open_paths=("/health", "/"),
            open_prefixes=(ui_path,) if ui_path else (),
        )
    served = [engine.model_name]
    _add_error_handlers(app)

    def transcribe(data: bytes, param: str) -> str:
        return transcriber.transcribe(data, param=param).text

    if ui_path:

        @app.get("/", include_in_schema=False)
        async def root() -> RedirectResponse:
            return RedirectResponse(f"{ui_path}/")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_name, "speech": transcriber is not None, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "phiclip"} for name in served],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, limits.max_upload_bytes * 4 // 3 + 1024 * 1024)
        data = parse_json(body)
        req: ChatRequest = await run_in_threadpool(
            parse_chat, data, served, limits, transcribe if transcriber is not None else None
        )
        if req.stream:
            return await _stream(engine, req)
        result = await asyncio.wrap_future(engine.submit(req.job))
        return _completion(req.model, result)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        if transcriber is None:
            raise ServeError("speech recognition is switched off on this server", 404, "invalid_request_error")
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise unsupported("send multipart/form-data with the recording in a field named 'file'")
        body = await _read_body(request, limits.max_upload_bytes + 256 * 1024)
        form = await _form(request, body)
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise bad_request("missing required field: file (the recording, sent as a file)", "file")
            model = form.get("model")
            if isinstance(model, str) and model and model not in (*WHISPER_ALIASES, transcriber.model_name):
                raise model_not_found(model, [*WHISPER_ALIASES, transcriber.model_name])
            language = form.get("language")
            language = language.strip() if isinstance(language, str) and language.strip() else None
            response_format = form.get("response_format") or "json"
            if response_format not in ("json", "text", "verbose_json"):
                raise bad_request("response_format must be json, text or verbose_json", "response_format")
            data = await upload.read()
        finally:
            await form.close()
        transcript = await run_in_threadpool(transcriber.transcribe, data, language, "file")
        if response_format == "text":
            return PlainTextResponse(transcript.text)
        if response_format == "verbose_json":
            return {
                "task": "transcribe",
                "text": transcript.text,
                "language": transcript.language,
                "duration": round(transcript.duration, 3),
            }
        return {"text": transcript.text}

    return app


# reading requests ----------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large(f"the request is {int(length) / 1e6:.1f} MB; the limit is {limit / 1e6:.1f} MB")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"the request is larger than the limit of {limit / 1e6:.1f} MB")
            chunks.append(chunk)
    except ClientDisconnect as err:
        raise ServeError("the client went away while sending the request", 499, "cancelled") from err
    return b"".join(chunks)


async def _form(request: Request, body: bytes):
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=16, max_part_size=64 * 1024)
    except (MultiPartException, HTTPException) as err:
        detail = getattr(err, "message", None) or getattr(err, "detail", str(err))
        raise bad_request(f"malformed multipart body: {detail}") from err


# answering -------------------------------------------------------------------------------------
def _logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """OpenAI's ``logprobs.content`` entries: token, logprob, UTF-8 bytes and the most likely alternatives."""

    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": max(logprob, -9999.0), "bytes": list(token.encode("utf-8"))}

    return [one(e.token, e.logprob) | {"top_logprobs": [one(t, v) for t, v in e.top]} for e in entries]


def _completion(model: str, result: Result) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None if choice.logprobs is None else {"content": _logprobs(choice.logprobs)},
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(result.choices)
        ],
        "usage": _usage(result),
        "phiclip": {
            "route": result.route,
            "draft": result.draft,
            "drafts": [c.draft for c in result.choices],
            "seconds": round(result.seconds, 3),
        },
    }


def _usage(result: Result) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def _stream(engine: Engine, req: ChatRequest) -> StreamingResponse:
    """Start the job and wait for its first event, so a refused request is still a plain 4xx."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, event)

    def done(_: Future) -> None:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, None)
        except RuntimeError:  # the event loop is gone (shutdown)
            pass

    job: Job = req.job
    future = engine.submit(job, emit)
    future.add_done_callback(done)
    try:
        first = await inbox.get()
    except asyncio.CancelledError:
        job.cancelled.set()
        future.cancel()
        raise
    if first is None:
        future.result()  # raises the request's ServeError, if any
    return StreamingResponse(
        _sse(req, job, future, first, inbox),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _sse(req: ChatRequest, job: Job, future: Future, first: Event | None, inbox: asyncio.Queue) -> AsyncIterator[str]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    logprobs = job.settings.logprobs

    def chunk(index: int, delta: dict, finish: str | None = None, entries: list[TokenLogprob] | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        if logprobs:
            choice["logprobs"] = None if entries is None else {"content": _logprobs(entries)}
        body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                "choices": [choice]}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        for index in range(job.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        event = first
        while event is not None:
            if event.kind == "delta":
                yield chunk(event.index, {"content": event.text}, entries=event.logprobs)
            event = await inbox.get()
        try:
            result = future.result()
        except ServeError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        except Exception:
            log.exception("generation failed")
            yield f"data: {json.dumps(ServeError('internal error while generating', 500, 'server_error').body())}\n\n"
        else:
            for index, choice in enumerate(result.choices):
                yield chunk(index, {}, choice.finish_reason)
            if req.include_usage:
                body = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req.model,
                    "choices": [],
                    "usage": _usage(result),
                }
                yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


# errors ---------------------------------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        body = ServeError(message, err.status_code, kind).body()
        return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
        return JSONResponse(bad_request(f"invalid request: {problems}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
        return JSONResponse(ServeError("internal server error", 500, "server_error").body(), status_code=500)
