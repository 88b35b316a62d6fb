"""llama.cpp operations, run as a script by the llama.cpp side environment's Python (``.venv-llama``).

It imports only the standard library, numpy and ``llama_cpp`` (llama-cpp-python), so PhiClip's own
environment does not need llama.cpp: :mod:`export.llamacpp` starts it as a subprocess. Commands
(arguments as JSON on the command line, results as JSON on stdout):

* ``quantize {"src", "dst", "type"}``: llama.cpp's own quantizer (``llama_model_quantize``).
* ``embed {"model", "mmproj", "image", "out", "width", "threads"}``: the image embeddings mtmd computes
  (``mtmd_encode_chunk``), saved as a ``(n_tokens, width)`` float32 ``.npy`` (``width``: the LM's hidden
  size; the LM is loaded vocabulary-only).
* ``chat {"model", "mmproj", "requests", "out", "threads", "n_ctx", "repack"}``: greedy answers through a plain
  ``Llama(..., chat_handler=MTMDChatHandler(mmproj))`` with the GGUF's embedded chat template; ``requests``
  is a JSON-lines file of ``{"id", "image", "question"}`` (``image``: a file path, a list of them, or null).
* ``tokens {"model", "mmproj", "messages"}``: the token ids and image slots ``MTMDChatHandler`` feeds llama.cpp.
* ``complete {"model", "lora", "lora_scale", "messages", ...}``: one greedy chat answer without an mmproj,
  optionally with a LoRA adapter GGUF (the text-only route).
* ``bench {"model", "mmproj", "image", "question", "history", "new_tokens", "threads", "repack"}``: prefill
  and decode seconds of one chat with an image (benchmarks/gguf.py).

``repack`` false turns off llama.cpp's weight repacking into extra buffer types (``use_extra_bufts``,
``--no-repack`` in llama.cpp's tools): CPUs that advertise AMX but cannot run it crash with
"Illegal instruction" on quantized types otherwise. ``Llama()`` has no such argument, so the
default model parameters are patched for the process.
"""

from __future__ import annotations

import base64
import ctypes
import json
import sys
import time
from pathlib import Path


def _no_repack(llama_cpp) -> None:
    """Make every model this process loads skip the extra (repacking) buffer types."""
    original = llama_cpp.llama_model_default_params

    def params():
        value = original()
        value.use_extra_bufts = False
        return value

    llama_cpp.llama_model_default_params = params
    import llama_cpp.llama as llama_module

    llama_module.llama_cpp.llama_model_default_params = params


def quantize(args: dict) -> dict:
    import llama_cpp

    types = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
             "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
             "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}
    if args["type"] not in types:
        raise SystemExit(f"quantize: unknown type {args['type']!r} (known: {', '.join(types)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[args["type"]]
    params.nthread = int(args.get("threads", 0))
    code = llama_cpp.llama_model_quantize(args["src"].encode(), args["dst"].encode(), ctypes.byref(params))
    if code != 0:
        raise SystemExit(f"llama_model_quantize returned {code} for {args['src']} -> {args['type']}")
    return {"dst": args["dst"]}


def embed(args: dict) -> dict:
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd
    import numpy as np

    if not args.get("repack", True):
        _no_repack(llama_cpp)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True  # mtmd needs the LM's n_embd only
    model = llama_cpp.llama_model_load_from_file(args["model"].encode(), mparams)
    if not model:
        raise SystemExit(f"could not load {args['model']}")
    cparams = mtmd.mtmd_context_params_default()
    cparams.use_gpu = False
    cparams.print_timings = False
    cparams.n_threads = int(args.get("threads", 1))
    ctx = mtmd.mtmd_init_from_file(args["mmproj"].encode(), model, cparams)
    if not ctx:
        raise SystemExit(f"could not load {args['mmproj']}")
    bitmap = mtmd.mtmd_helper_bitmap_init_from_file(ctx, args["image"].encode(), False)
    if not bitmap:
        raise SystemExit(f"could not read {args['image']}")
    chunks = mtmd.mtmd_input_chunks_init()
    text = mtmd.mtmd_input_text()
    marker = mtmd.mtmd_default_marker()
    text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
    array = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), array, 1) != 0:
        raise SystemExit("mtmd_tokenize failed")
    rows = None
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            continue
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
            raise SystemExit("mtmd_encode_chunk failed")
        width = int(args["width"])  # a vocab-only model reports n_embd 0
        pointer = mtmd.mtmd_get_output_embd(ctx)
        rows = np.ctypeslib.as_array(pointer, shape=(n_tokens * width,)).reshape(n_tokens, width).copy()
    if rows is None:
        raise SystemExit("mtmd produced no image chunk")
    np.save(args["out"], rows.astype(np.float32))
    mtmd.mtmd_input_chunks_free(chunks)
    mtmd.mtmd_bitmap_free(bitmap)
    mtmd.mtmd_free(ctx)
    llama_cpp.llama_model_free(model)
    return {"out": args["out"], "shape": list(rows.shape)}


def _llama(args: dict, chat_handler=None):
    import llama_cpp

    if not args.get("repack", True):
        _no_repack(llama_cpp)
    threads = int(args.get("threads", 1))
    return llama_cpp.Llama(
        model_path=args["model"], chat_handler=chat_handler, n_ctx=int(args.get("n_ctx", 2048)),
        n_threads=threads, n_threads_batch=threads, seed=0, verbose=bool(args.get("verbose", False)),
        lora_path=args.get("lora"), lora_scale=float(args.get("lora_scale", 1.0)),
    )


def _image_url(path: str) -> str:
    data = Path(path).read_bytes()
    kind = "png" if data[:4] == b"\x89PNG" else "jpeg"
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _user_message(question: str, image: str | list[str] | None) -> dict:
    """A user turn: its images (a path or a list of paths) first, then the question."""
    images = [] if image is None else [image] if isinstance(image, str) else list(image)
    if not images:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": _image_url(path)}}
                                          for path in images), {"type": "text", "text": question}]}


def _greedy(llm, messages: list[dict], max_tokens: int) -> str:
    result = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                        max_tokens=max_tokens, seed=0)
    return result["choices"][0]["message"]["content"]


def chat(args: dict) -> dict:
    from llama_cpp.llama_chat_format import MTMDChatHandler

    llm = _llama(args, MTMDChatHandler(clip_model_path=args["mmproj"], verbose=False, use_gpu=False))
    max_tokens = int(args.get("max_tokens", 32))
    with open(args["requests"], encoding="utf-8") as src, open(args["out"], "w", encoding="utf-8") as out:
        for line in src:
            request = json.loads(line)
            answer = _greedy(llm, [_user_message(request["question"], request.get("image"))], max_tokens)
            out.write(json.dumps({"id": request["id"], "answer": answer}) + "\n")
    return {"out": args["out"]}


def tokens(args: dict) -> dict:
    """What a plain ``MTMDChatHandler`` feeds llama.cpp for ``messages``: text token ids and image slots, in order.

    ``messages`` may name images as ``{"type": "image_path", "path": ...}`` parts (sent as data URLs).
    The handler's own call to ``mtmd_tokenize`` is observed; one token is generated.
    """
    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=args["mmproj"], verbose=False, use_gpu=False)
    seen: list = []

    class Observed:
        def __getattr__(self, name):
            return getattr(mtmd, name)

        def mtmd_tokenize(self, ctx, chunks, text, bitmaps, n_bitmaps):
            code = mtmd.mtmd_tokenize(ctx, chunks, text, bitmaps, n_bitmaps)
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    count = ctypes.c_size_t()
                    ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                    seen.extend(int(ids[j]) for j in range(count.value))
                else:
                    seen.append({"image": int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))})
            return code

    handler._mtmd_cpp = Observed()
    llm = _llama(args, handler)
    messages = []
    for message in args["messages"]:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image_url", "image_url": {"url": _image_url(part["path"])}}
                       if part["type"] == "image_path" else part for part in content]
        messages.append(dict(message, content=content))
    _greedy(llm, messages, 1)
    return {"sequence": seen}


def complete(args: dict) -> dict:
    llm = _llama(args)
    return {"answer": _greedy(llm, args["messages"], int(args.get("max_tokens", 32)))}


def bench(args: dict) -> dict:
    """Seconds to the first new token (prefill, image included) and for the rest, of one chat with an image.

    ``history``: earlier messages; the last user message asks ``question`` about ``image``. End of
    turn is banned, so exactly ``new_tokens`` tokens are generated. The model is loaded (and one
    warm-up token generated) before the timed run.
    """
    from llama_cpp.llama_chat_format import MTMDChatHandler

    llm = _llama(args, MTMDChatHandler(clip_model_path=args["mmproj"], verbose=False, use_gpu=False))
    messages = [*args["history"], _user_message(args["question"], args["image"])]
    new_tokens = int(args["new_tokens"])
    ban = {llm.token_eos(): -1e9}
    _greedy(llm, messages[-1:], 1)
    started = time.perf_counter()
    first = None
    count = 0
    for part in llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                           max_tokens=new_tokens, stream=True, logit_bias=ban):
        if part["choices"][0]["delta"].get("content") is not None:
            first = first or time.perf_counter()
            count += 1
    done = time.perf_counter()
    return {"prefill_s": first - started, "decode_s": done - first, "streamed": count}


COMMANDS = {"quantize": quantize, "embed": embed, "chat": chat, "tokens": tokens, "complete": complete,
            "bench": bench}

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: {sys.argv[0]} {{{'|'.join(COMMANDS)}}} JSON")
    print(json.dumps(COMMANDS[sys.argv[1]](json.loads(sys.argv[2]))))
