"""Answer questions with a trained run: ``generate()`` with KV cache, streaming, routing.

A question with an image goes to the fine-tuned model. A question without one goes to the
base LM with the adapter disabled (the same weights, no second copy): a LoRA trained on
short visual answers would otherwise turn every text reply into a one-word answer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, TextIteratorStreamer

from train.config import RunConfig, load_config
from train.records import IMAGE_PLACEHOLDER
from train.template import encode_prompt
from train.build import IMAGE_TOKEN, build_model, default_device
from train.weights import ADAPTER_DIR, load_trainable
from train.run import PROCESSOR_DIR


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature > 0:
            out.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            out.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return out


class VisionChat:
    """A loaded run: ``answer()``/``stream()`` for one conversation, ``answer_batch()`` for many."""

    def __init__(self, model: torch.nn.Module, tokenizer, image_processor, n_image_tokens: int, config: RunConfig):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.n_image_tokens = n_image_tokens
        self.config = config
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    @classmethod
    def from_run(cls, run_dir: str | Path, device: torch.device | None = None) -> "VisionChat":
        run = Path(run_dir)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run} is not a phiclip run directory (no config.yaml)")
        cfg = load_config(run / "config.yaml")
        has_adapter = (run / ADAPTER_DIR).is_dir()
        lora = cfg.lora if has_adapter else replace(cfg.lora, quantize="none")
        built = build_model(cfg.model, lora, device or default_device())
        model: torch.nn.Module = built.model
        if has_adapter:
            model = PeftModel.from_pretrained(model, str(run / ADAPTER_DIR))
        load_trainable(model, run)
        tokenizer = AutoTokenizer.from_pretrained(run / PROCESSOR_DIR)
        image_processor = AutoImageProcessor.from_pretrained(run / PROCESSOR_DIR)
        return cls(model, tokenizer, image_processor, built.n_image_tokens, cfg)

    @property
    def context_length(self) -> int:
        text = self.model.config.text_config if hasattr(self.model.config, "text_config") else self.model.config
        return int(getattr(text, "max_position_embeddings", 2048))

    def prompt_ids(self, messages: list[dict[str, str]], with_image: bool) -> list[int]:
        """Render like training: the image placeholder goes at the start of the first user turn."""
        messages = [dict(m) for m in messages]
        if self.config.data.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.config.data.system_prompt})
        if with_image and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first]["content"] = f"{IMAGE_PLACEHOLDER}\n{messages[first]['content']}"
        if not with_image:
            for m in messages:
                m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, "")
        return encode_prompt(
            self.tokenizer, messages, image_token=IMAGE_TOKEN, n_image_tokens=self.n_image_tokens if with_image else 0
        )

    def model_inputs(self, conversations: list[list[dict[str, str]]], images: list[Image.Image | None]) -> dict:
        """Left-padded batch; all items must agree on having an image or not."""
        with_image = images[0] is not None
        rows = [self.prompt_ids(m, with_image) for m in conversations]
        longest = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=self.device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if with_image:
            pixels = self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
            inputs["pixel_values"] = pixels.to(self.device, next(self.model.parameters()).dtype)
        return inputs

    def _route(self, with_image: bool):
        """Adapter on for image questions; the plain base LM for text and speech."""
        if not with_image and isinstance(self.model, PeftModel):
            return self.model.disable_adapter()
        return contextlib.nullcontext()

    def _generate(self, inputs: dict, settings: GenerationSettings, streamer=None) -> torch.Tensor:
        with self._lock, self._route("pixel_values" in inputs), torch.no_grad():
            return self.model.generate(
                **inputs,
                **settings.kwargs(),
                pad_token_id=self.tokenizer.pad_token_id,
                streamer=streamer,
            )

    def answer_batch(
        self,
        conversations: list[list[dict[str, str]]],
        images: list[Image.Image | None],
        settings: GenerationSettings | None = None,
    ) -> list[str]:
        settings = settings or GenerationSettings()
        inputs = self.model_inputs(conversations, images)
        out = self._generate(inputs, settings)
        new = out[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def answer(self, messages: list[dict[str, str]], image: Image.Image | None = None,
               settings: GenerationSettings | None = None) -> str:
        return self.answer_batch([messages], [image], settings)[0]

    def stream(self, messages: list[dict[str, str]], image: Image.Image | None = None,
               settings: GenerationSettings | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are generated (generation runs in a worker thread)."""
        settings = settings or GenerationSettings()
        inputs = self.model_inputs([messages], [image])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                self._generate(inputs, settings, streamer)
            except BaseException as err:  # surfaced to the caller below
                errors.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]
