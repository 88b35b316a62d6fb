"""The text files of a GGUF export: the Ollama ``Modelfile``\\ s and the repository's model card ``README.md``.

Ollama templates are Go templates, not Jinja: :func:`chat_turns` reads the role markers off the
model's own chat template by rendering sentinel messages, and :func:`ollama_template` writes them
back as a Go template. :func:`modelfile` adds the files (LM, then mmproj), the stop strings and the
settings that reproduce PhiClip's greedy answers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

_SYS, _USR, _AST, _USR2 = "\ue010SYS\ue011", "\ue010USR\ue011", "\ue010AST\ue011", "\ue010USR2\ue011"


class TemplateShapeError(ValueError):
    """The chat template does not wrap each message in fixed role markers, so no Go template can copy it."""


@dataclass(frozen=True)
class ChatTurns:
    """Fixed text around each message, as the chat template writes it.

    ``prefix``: before the first message; ``system``/``user``/``assistant``: ``(before, after)``
    the content; ``generation``: what opens the assistant's answer; ``default_system``: the system
    message the template adds when there is none ("" if none).
    """

    prefix: str
    system: tuple[str, str]
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    default_system: str


def _between(text: str, start: str, end: str | None) -> str:
    at = text.index(start) + len(start)
    return text[at:] if end is None else text[at:text.index(end, at)]


def _conversation_end(user_after: str, assistant_after: str, user_to_assistant: str, assistant_to_user: str) -> str:
    """The longest text that ends both a conversation's last user and last assistant message but follows neither
    inside a conversation ("" when messages close the same wherever they stand)."""
    if user_to_assistant.startswith(user_after) and assistant_to_user.startswith(assistant_after):
        return ""
    shared = 0
    for a, b in zip(reversed(user_after), reversed(assistant_after)):
        if a != b:
            break
        shared += 1
    for n in range(1, shared + 1):  # the shortest such text: messages keep as much of their closing as they can
        if user_to_assistant.startswith(user_after[:-n]) and assistant_to_user.startswith(assistant_after[:-n]):
            return user_after[-n:]
    return ""


def chat_turns(render: Callable[[list[dict], bool], str]) -> ChatTurns:
    """Role markers of the template behind ``render(messages, add_generation_prompt)``.

    Raises :class:`TemplateShapeError` when the template does not wrap messages in fixed markers.
    """
    sys_ = {"role": "system", "content": _SYS}
    usr, ast, usr2 = ({"role": "user", "content": _USR}, {"role": "assistant", "content": _AST},
                      {"role": "user", "content": _USR2})
    full = render([sys_, usr, ast, usr2], False)
    with_answer = render([sys_, usr, ast], False)
    opened = render([sys_, usr], True)
    closed = render([sys_, usr], False)
    alone = render([usr], False)
    try:
        full_head = full[:full.index(_SYS)]
        user_after = _between(full, _USR2, None)
        assistant_after = _between(with_answer, _AST, None)
        user_to_assistant = _between(full, _USR, _AST)
        assistant_to_user = _between(full, _AST, _USR2)
        system_to_user = _between(full, _SYS, _USR)
        alone_head = alone[:alone.index(_USR)]
    except ValueError as err:
        raise TemplateShapeError(f"the chat template drops or rewrites message content: {err}") from err
    # Text the template writes once, after the last message of a conversation without a generation prompt
    # (Phi-3's `<|endoftext|>`): not part of how a message closes, and never in a prompt Ollama renders.
    end = _conversation_end(user_after, assistant_after, user_to_assistant, assistant_to_user)
    user_after, assistant_after = user_after.removesuffix(end), assistant_after.removesuffix(end)
    closed = closed.removesuffix(end)
    if not (user_to_assistant.startswith(user_after) and assistant_to_user.startswith(assistant_after)):
        raise TemplateShapeError("the chat template closes a message differently depending on what follows")
    assistant_before = user_to_assistant[len(user_after):]
    user_before = assistant_to_user[len(assistant_after):]
    if not (system_to_user.endswith(user_before) and alone_head.endswith(user_before)):
        raise TemplateShapeError("the chat template opens the first user message differently from later ones")
    system_after = system_to_user[:len(system_to_user) - len(user_before)]
    generation = opened[len(closed):] if opened.startswith(closed) else ""
    before_user = alone_head[:len(alone_head) - len(user_before)]
    if full_head.startswith(before_user):  # no system message of its own: what precedes is a global prefix
        prefix, default_system = before_user, ""
    elif before_user.startswith(full_head) and before_user.endswith(system_after):
        prefix, default_system = "", before_user[len(full_head):len(before_user) - len(system_after)]
        if not default_system:
            raise TemplateShapeError("the chat template writes an empty system block when there is no system message "
                                     "(as Llama 3.1's dated header does); a Modelfile's template cannot copy that")
    else:
        raise TemplateShapeError("the chat template's default system message cannot be isolated")
    return ChatTurns(prefix, (full_head[len(prefix):], system_after), (user_before, user_after),
                     (assistant_before, assistant_after), generation, default_system)


def _go(text: str) -> str:
    """A Go template literal for ``text`` (actions are escaped through a string constant)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(turns: ChatTurns) -> str:
    """Go template that renders ``.Messages`` as the chat template does (the system block at the start)."""
    return (
        f"{_go(turns.prefix)}"
        "{{ range .Messages }}"
        f'{{{{ if eq .Role "system" }}}}{_go(turns.system[0])}{{{{ .Content }}}}{_go(turns.system[1])}'
        f'{{{{ else if eq .Role "user" }}}}{_go(turns.user[0])}{{{{ .Content }}}}{_go(turns.user[1])}'
        f'{{{{ else if eq .Role "assistant" }}}}{_go(turns.assistant[0])}{{{{ .Content }}}}{_go(turns.assistant[1])}'
        "{{ end }}{{ end }}"
        f"{_go(turns.generation)}"
    )


def _quote(text: str) -> str:
    if '"""' in text:
        raise TemplateShapeError('the text contains """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(lm_file: str, mmproj_file: str | None, turns: ChatTurns, stops: list[str],
              adapter_file: str | None = None) -> str:
    """An Ollama Modelfile: ``FROM`` the LM (then the mmproj), the template, stops and greedy settings."""
    lines = [f"FROM ./{lm_file}"]
    if mmproj_file:
        lines.append(f"FROM ./{mmproj_file}")
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    lines.append(f"TEMPLATE {_quote(ollama_template(turns))}")
    if turns.default_system:
        lines.append(f"SYSTEM {_quote(turns.default_system)}")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    # PhiClip's reference answers are greedy without a repetition penalty (Ollama's default is 1.1).
    lines += ["PARAMETER temperature 0", "PARAMETER repeat_penalty 1", "PARAMETER num_ctx 4096"]
    return "\n".join(lines) + "\n"


@dataclass
class CardFacts:
    """Everything the card states; sizes in bytes, figures as measured at export time."""

    repo_id: str
    name: str
    lm_files: dict[str, int]  # file -> size, f16 first
    mmproj_file: str
    mmproj_size: int
    text_files: dict[str, int]  # base LM and LoRA adapter (text-only route), may be empty
    base_models: list[str]
    vision: str
    vision_exact: bool
    cosine_square: float
    cosine_wide: float
    image_aspect: str
    pad_colour: tuple[int, int, int]
    llama_pad_colour: tuple[int, int, int]
    image_size: int
    n_image_tokens: int
    llama_cpp_python: str
    default_quant: str
    no_modelfile: str | None = None  # why no Ollama Modelfile was written (None: it was)


def _size(n: int) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KB"
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def _preparation(f: CardFacts) -> str:
    same_colour = tuple(f.pad_colour) == tuple(f.llama_pad_colour)
    lines = [
        f"llama.cpp prepares an image for this projector type by resizing it to fit {f.image_size}x{f.image_size} "
        f"(bicubic, aspect kept) and padding the rest with RGB {tuple(f.llama_pad_colour)}, centred; it never crops. "
        "A square image is only resized, exactly as PhiClip does.",
    ]
    if f.image_aspect == "crop":
        lines.append("This model was trained with centre-crop (resize the short side, crop the middle): for a "
                     "non-square picture llama.cpp shows the model the whole picture with bands instead of the "
                     "cropped middle. Crop pictures to a square yourself to get the trained view.")
    else:
        colour = ("the same colour" if same_colour
                  else f"RGB {tuple(f.pad_colour)} (llama.cpp: {tuple(f.llama_pad_colour)})")
        lines.append(f"This model was trained padding pictures to a square with {colour}, image centred.")
    lines.append("llama.cpp decodes files with stb_image: it ignores the EXIF orientation of phone photos and drops "
                 "transparency (PhiClip turns photos upright and puts transparent pixels on white), so rotate and "
                 "flatten such pictures first.")
    lines.append(f"Measured at export: per-token cosine of llama.cpp's image embeddings against PhiClip's, "
                 f"square picture {f.cosine_square:.5f} (minimum over tokens), 3:2 picture {f.cosine_wide:.5f}.")
    return " ".join(lines)


def card(f: CardFacts) -> str:
    """The README.md of the GGUF repository."""
    quant = f.default_quant
    lm_default = next(name for name in f.lm_files if quant.upper() in name.upper())
    tag = "" if quant == "f16" else f":{quant.upper()}"
    hf_file = f" --hf-file {lm_default}" if quant == "f16" else ""
    rows = "\n".join(f"| `{name}` | {_size(size)} | language model, LoRA merged |" for name, size in f.lm_files.items())
    rows += f"\n| `{f.mmproj_file}` | {_size(f.mmproj_size)} | vision tower + projector (f16) |"
    rows += "".join(f"\n| `{name}` | {_size(size)} | text-only route |" for name, size in f.text_files.items())
    hub_ids = [m for m in f.base_models if re.fullmatch(r"[\w.-]+/[\w.-]+", m) and not m.startswith(".")]
    base = "".join(f"\n  - {m}" for m in hub_ids) or " []"
    text_route = ""
    if f.text_files:
        base_file, lora_file = list(f.text_files)
        second_model = (f"create a second model from `Modelfile.text-only` (`ollama create {f.name}-text -f "
                        "Modelfile.text-only`)" if f.no_modelfile is None else f"load `{base_file}` as a second model")
        text_route = f"""
## Text-only questions: base model + LoRA adapter

PhiClip answers questions without an image with its base language model (the LoRA adapter off).
`{base_file}` is that base model and `{lora_file}` the adapter as a llama.cpp LoRA file. llama-server
loads both and switches the adapter per request:

```sh
llama-server -m {base_file} --mmproj {f.mmproj_file} --lora {lora_file} --lora-init-without-apply
# image questions: "lora": [{{"id": 0, "scale": 1.0}}] in the request; text-only: scale 0.0
```

Ollama and LM Studio cannot switch an adapter per request: {second_model} for text-only questions, or use
the merged model for everything (text-only answers then come from the adapted model, not the base).
"""
    ollama = f"""```sh
ollama create {f.name} -f Modelfile
ollama run {f.name} "What is in the picture? ./photo.png"
```

The Modelfile loads the language model and the mmproj and carries the chat template as a Go template.
Ollama writes its image tag straight before the text, without the newline PhiClip trains with.""" if (
        f.no_modelfile is None) else (
        f"This export has no Modelfile: {f.no_modelfile}, and an Ollama template (Go) can only wrap each message "
        "in fixed role markers. llama.cpp and LM Studio render the chat template embedded in the GGUF itself.")
    exact = ("llama.cpp computes exactly PhiClip's image features." if f.vision_exact else
             f"Image features are {f.vision} (exported with `--allow-approximate-vision`; llama.cpp "
             f"{f.llama_cpp_python} has no exact form). Per-token cosine against PhiClip's, measured at export: "
             f"{f.cosine_square:.5f} (minimum, square picture). See *Image features* below.")
    return f"""---
license: mit
library_name: gguf
pipeline_tag: image-text-to-text
tags:
  - gguf
  - llama.cpp
  - ollama
  - lm-studio
  - vision
  - phiclip
base_model:{base}
---

# {f.name} (GGUF)

A PhiClip vision-language model for llama.cpp, Ollama and LM Studio: the language model with its
LoRA adapter merged, and an `mmproj` file with the vision tower and projector. One image takes
{f.n_image_tokens} tokens. {exact}

| file | size | what |
|---|---|---|
{rows}

## llama.cpp

```sh
llama-mtmd-cli -m {lm_default} --mmproj {f.mmproj_file} --image photo.png -p "What is in the picture?" \\
  --temp 0 --repeat-penalty 1
llama-server -hf {f.repo_id}{tag}{hf_file}    # finds {f.mmproj_file} by its name
```

## llama-cpp-python

```python
from llama_cpp import Llama
from llama_cpp.llama_chat_format import MTMDChatHandler

llm = Llama(model_path="{lm_default}", chat_handler=MTMDChatHandler(clip_model_path="{f.mmproj_file}"), n_ctx=4096)
answer = llm.create_chat_completion(messages=[{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": "file:///path/to/photo.png"}}}},
    {{"type": "text", "text": "What is in the picture?"}}]}}], temperature=0, repeat_penalty=1.0)
```

The chat template embedded in the GGUF places the image where PhiClip's processor does (first in
the message, then a newline, then the text), for `MTMDChatHandler` and for llama-server's markers.

## Ollama

{ollama}

## LM Studio

Download this repository (LM Studio pairs `{f.mmproj_file}` with the model by its name), load
`{lm_default}` and attach an image in the chat. Set temperature 0 and repeat penalty 1 for the
answers PhiClip gives.
{text_route}
## Image features

{_preparation(f)}

## Settings and known limits

- Greedy answers equal to PhiClip's need temperature 0 and repeat penalty 1.0 (llama.cpp's default is 1.1).
- Quantized files on a CPU that advertises AMX but cannot run it crash with "Illegal instruction" when
  llama.cpp repacks weights: pass `--no-repack` to llama.cpp's tools (`use_extra_bufts = False` in the
  model parameters of the C API; llama-cpp-python's `Llama()` has no argument for it).
- Tested with llama-cpp-python {f.llama_cpp_python} (its vendored llama.cpp) through `Llama` + `MTMDChatHandler`; the
  embedded template also with llama.cpp's own Jinja engine (llama-server's). llama-server, llama-mtmd-cli,
  Ollama and LM Studio themselves were not run.
"""
