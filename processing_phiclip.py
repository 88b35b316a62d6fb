"""Processor for PhiClip: the tower's image processor and the LM's tokenizer with one ``<image>`` token.

Each image is one ``<image>`` token in the text; the model splices the image's features in
its place, so the processor need not know how many features an image has. The chat
template is the LM's own, preceded by a short preamble that turns content parts
(``{"type": "image"}``, ``{"type": "text", ...}``) into the layout PhiClip trains on:
``<image>\\n`` at the start of the message, then the text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import BatchFeature, ProcessorMixin

# Jinja: build a new message list (the sandbox forbids mutating the old one) and rebind
# ``messages`` to it before the LM's template runs; ``dict(m, content=...)`` keeps the other keys.
_PREAMBLE = """{%- set _pc = namespace(messages=[]) -%}
{%- for _msg in messages -%}
{%- if _msg['content'] is none -%}
{%- set _pc.messages = _pc.messages + [_msg] -%}
{%- elif _msg['content'] is string -%}
{%- set _pc.messages = _pc.messages + [dict(_msg, content=(_msg['content'] | trim))] -%}
{%- else -%}
{%- set _parts = namespace(images='', text='') -%}
{%- for _part in _msg['content'] -%}
{%- if _part['type'] in ('image', 'image_url', 'image_pil') -%}
{%- set _parts.images = _parts.images + '__IMAGE__\\n' -%}
{%- elif _part['type'] == 'text' -%}
{%- set _parts.text = _parts.text + (' ' if _parts.text else '') + _part['text'] -%}
{%- endif -%}
{%- endfor -%}
{%- set _pc.messages = _pc.messages + [dict(_msg, content=(_parts.images + _parts.text) | trim)] -%}
{%- endif -%}
{%- endfor -%}
__SYSTEM__{%- set messages = _pc.messages -%}
"""

_SYSTEM = """{%- if not _pc.messages or _pc.messages[0]['role'] != 'system' -%}
{%- set _pc.messages = [{'role': 'system', 'content': __PROMPT__}] + _pc.messages -%}
{%- endif -%}
"""


def wrap_chat_template(lm_template: str, system_prompt: str | None = None, image_token: str = "<image>") -> str:
    """The LM's chat template preceded by the content-parts preamble (and a default system prompt)."""
    if not isinstance(lm_template, str) or not lm_template.strip():
        raise ValueError("the tokenizer has no chat template to wrap")
    system = ""
    if system_prompt is not None:
        literal = system_prompt.strip().replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
        system = _SYSTEM.replace("__PROMPT__", f"'{literal}'")
    return _PREAMBLE.replace("__IMAGE__", image_token).replace("__SYSTEM__", system) + lm_template


def _is_image(value: Any) -> bool:
    return hasattr(value, "convert") or hasattr(value, "shape")


class PhiClipProcessor(ProcessorMixin):
    """``processor(images=..., text=...)`` -> ``input_ids``, ``attention_mask`` (left-padded), ``pixel_values``.

    A text holding ``<image>`` tokens is tokenized as it is, one image per token. A text
    without any that comes with images is a question: it is rendered with the chat template
    as one user turn, its images first, ready for generation. ``apply_chat_template`` takes
    messages whose content is a string or a list of image and text parts.
    """

    attributes = ["image_processor", "tokenizer"]
    _auto_class = "AutoProcessor"  # save_pretrained writes the auto_map that trust_remote_code loading needs
    if not hasattr(ProcessorMixin, "get_attributes"):  # transformers 4.x finds sub-processors by these names
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None,
                 image_token: str = "<image>", **kwargs: Any) -> None:
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_parts(cls, image_processor, tokenizer, system_prompt: str | None = None,
                   image_token: str = "<image>") -> "PhiClipProcessor":
        """A processor for a new PhiClip: adds ``<image>`` (and a pad token) to the LM's tokenizer and wraps its template."""
        if tokenizer.chat_template is None:
            raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no chat template; PhiClip renders chats with it")
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [image_token]})
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # One template for everything: the tokenizer's own (text-generation pipelines, training) and the processor's.
        tokenizer.chat_template = wrap_chat_template(tokenizer.chat_template, system_prompt, image_token)
        return cls(image_processor, tokenizer, chat_template=tokenizer.chat_template, image_token=image_token)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def _images_per_text(self, texts: list[str], images: Any) -> list[list[Any]]:
        if images is None:
            return [[] for _ in texts]
        if _is_image(images):
            images = [images]
        if images and all(isinstance(item, (list, tuple)) for item in images):
            if len(images) != len(texts):
                raise ValueError(f"{len(images)} lists of images for {len(texts)} texts")
            return [list(item) for item in images]
        images = list(images)
        if len(texts) == 1:
            return [images]
        markers = [text.count(self.image_token) for text in texts]
        if len(images) == len(texts) and not any(markers):
            return [[image] for image in images]
        if sum(markers) != len(images):
            raise ValueError(f"{len(images)} images for {sum(markers)} {self.image_token} tokens in {len(texts)} texts")
        out, at = [], 0
        for n in markers:
            out.append(images[at:at + n])
            at += n
        return out

    def __call__(self, images: Any = None, text: str | list[str] | None = None, return_tensors: str | None = None,
                 padding: bool | str = True, **kwargs: Any) -> BatchFeature:
        if text is None:
            raise ValueError("text is required: a question, or a prompt with one <image> token per image")
        texts = [text] if isinstance(text, str) else list(text)
        per_text = self._images_per_text(texts, images)
        prompts = []
        for i, (prompt, its_images) in enumerate(zip(texts, per_text)):
            markers = prompt.count(self.image_token)
            if its_images and markers == 0:
                content = [{"type": "image"} for _ in its_images] + [{"type": "text", "text": prompt}]
                prompt = self.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
            elif markers != len(its_images):
                raise ValueError(f"text {i}: {markers} {self.image_token} token(s) but {len(its_images)} image(s)")
            prompts.append(prompt)
        rows = [self._tokenize(prompt) for prompt in prompts]
        if padding:
            encoded = self.tokenizer.pad({"input_ids": rows}, padding=padding,
                                         padding_side=kwargs.get("padding_side", "left"))
            data = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
        else:
            data = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]}
        flat = [image for its_images in per_text for image in its_images]
        if flat:
            data["pixel_values"] = self.image_processor(
                images=[im.convert("RGB") if hasattr(im, "convert") else im for im in flat], return_tensors="pt"
            )["pixel_values"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _tokenize(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt, cut where answers start, as training tokenizes it.

        Training tokenizes the text before each answer on its own, so an inference prompt ends
        on the same tokens (Llama-3's ``"\n\n"`` would otherwise merge with the answer's first
        characters). Answers start right after the template's generation prompt.
        """
        marker = self._generation_prompt()
        pieces, at = [], 0
        while marker and (found := prompt.find(marker, at)) >= 0:
            pieces.append(prompt[at:found + len(marker)])
            at = found + len(marker)
        pieces.append(prompt[at:])
        ids: list[int] = []
        for piece in filter(None, pieces):  # the chat template writes every special token itself
            ids.extend(self.tokenizer(piece, add_special_tokens=False)["input_ids"])
        return ids

    def _generation_prompt(self) -> str:
        """The text the chat template appends to open an assistant turn ("" if it cannot be isolated)."""
        probe = [{"role": "user", "content": "x"}]
        opened = self.tokenizer.apply_chat_template(probe, chat_template=self.chat_template, tokenize=False,
                                                    add_generation_prompt=True)
        closed = self.tokenizer.apply_chat_template(probe, chat_template=self.chat_template, tokenize=False)
        return opened[len(closed):] if opened.startswith(closed) else ""

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Also keeps ``tokenizer_config.json`` readable by transformers 4.x, which knows neither the
        ``TokenizersBackend`` class name 5.x writes nor ``extra_special_tokens`` given as a list."""
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        path = Path(save_directory) / "tokenizer_config.json"
        if path.is_file():
            config = json.loads(path.read_text(encoding="utf-8"))
            if config.get("tokenizer_class") == "TokenizersBackend":
                config["tokenizer_class"] = "PreTrainedTokenizerFast"
            if isinstance(config.get("extra_special_tokens"), list):
                config["additional_special_tokens"] = config.pop("extra_special_tokens")
            path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return saved

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs: Any):
        """Decoded text of each row of ``generate()``'s output (prompt included, as the pipeline expects)."""
        if getattr(generated_outputs, "ndim", 2) == 1:
            return self.tokenizer.decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
        return self.tokenizer.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)
