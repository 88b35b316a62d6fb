"""A processor chat template that puts ``<image>`` where phiclip puts it, inside the LM's own template.

Processors, vLLM's OpenAI server, lmms-eval and ``pipeline("image-text-to-text")`` send
messages whose ``content`` is a list of parts (``{"type": "image"}``,
``{"type": "text", "text": ...}``). The LM's chat template only knows string content, so
a short preamble rewrites every message first: image parts become ``<image>\\n`` at the
start of the text (the layout phiclip trained on), text parts are joined, and the result is
trimmed as phiclip trims it. The LM's template then renders the rewritten messages
unchanged, so text-only conversations come out exactly as the LM formats them.
"""

from __future__ import annotations

from train.build import IMAGE_TOKEN

# Jinja: build a new message list (the sandbox forbids mutating the old one) and rebind
# ``messages`` to it before the LM's template runs. ``dict(m, content=...)`` keeps every
# other key (tool calls, names) of a message.
_PREAMBLE = """{%- set _vlm = namespace(messages=[]) -%}
{%- for _msg in messages -%}
{%- if _msg['content'] is none -%}
{%- set _vlm.messages = _vlm.messages + [_msg] -%}
{%- elif _msg['content'] is string -%}
{%- set _vlm.messages = _vlm.messages + [dict(_msg, content=(_msg['content'] | trim))] -%}
{%- else -%}
{%- set _parts = namespace(images='', text='') -%}
{%- for _part in _msg['content'] -%}
{%- if _part['type'] in ('image', 'image_url', 'image_pil') -%}
{%- set _parts.images = _parts.images + '__IMAGE__\\n' -%}
{%- elif _part['type'] == 'text' -%}
{%- set _parts.text = _parts.text + (' ' if _parts.text else '') + _part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set _vlm.messages = _vlm.messages + [dict(_msg, content=(_parts.images + _parts.text) | trim)] -%}
{%- endif -%}
{%- endfor -%}
__SYSTEM__{%- set messages = _vlm.messages -%}
"""

_SYSTEM = """{%- if not messages or messages[0]['role'] != 'system' -%}
{%- set _vlm.messages = [{'role': 'system', 'content': __PROMPT__}] + _vlm.messages -%}
{%- endif -%}
"""


def _jinja_string(text: str) -> str:
    """A Jinja string literal for ``text`` (single-quoted, backslashes and quotes escaped)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"'{escaped}'"


def wrap_chat_template(lm_template: str, system_prompt: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
    """The LM's template preceded by the content-list preamble (and the run's system prompt, if any).

    ``system_prompt`` is trimmed as phiclip trims every message.
    """
    if not isinstance(lm_template, str) or not lm_template.strip():
        raise ValueError("the tokenizer has no chat template to wrap")
    system = ""
    if system_prompt is not None:
        system = _SYSTEM.replace("__PROMPT__", _jinja_string(system_prompt.strip()))
    preamble = _PREAMBLE.replace("__IMAGE__", image_token).replace("__SYSTEM__", system)
    return preamble + lm_template
