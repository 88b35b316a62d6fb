"""Answer questions with a PhiClip model: batches, streaming, and prompts rendered exactly as in training.

The model routes by itself: a question with an image goes through the fine-tuned model,
one without (typed or spoken text) through the base LM with the adapter disabled (the same
weights, no second copy), unless the model's config turns that off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import PhiClipProcessor
from train.build import default_device, pick_dtype, quantization
from train.config import load_config
from train.records import IMAGE_PLACEHOLDER
from train.rundir import model_dir
from train.template import encode_prompt


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


@dataclass
class Completion:
    """One generated answer: its text, the new token ids (up to and including EOS), and why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": end of turn; "length": max_new_tokens reached


@dataclass
class Stream:
    """Text pieces as they are generated; ``completion`` is set once the iteration has ended."""

    pieces: Iterator[str]
    completion: Completion | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self.pieces


def locate(source: str | Path) -> str:
    """A run directory means the model it saved (``model/``); a PhiClip folder or a Hub repo id is used as is."""
    path = Path(source)
    if path.is_dir():
        folder = model_dir(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{source} is neither a PhiClip folder (no config.json) nor a training run (no model/)")
        return str(folder)
    if path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise FileNotFoundError(f"{source}: no such folder, and not a Hub repo id (owner/name)")
    return str(source)


class VisionChat:
    """A loaded model: ``answer()``/``stream()`` for one conversation, ``complete()``/``answer_batch()`` for many."""

    def __init__(self, model: PhiClipForCausalLM, processor: PhiClipProcessor) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.n_image_tokens = model.image_token_count()
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()

    @classmethod
    def load(cls, source: str | Path, device: torch.device | str | None = None, **kwargs) -> "VisionChat":
        """From a training run directory, a PhiClip folder or a Hub repo id; ``kwargs`` go to ``from_pretrained``."""
        where = locate(source)
        if device is not None:
            kwargs.setdefault("device_map", str(device))
        run_config = Path(source) / "config.yaml"
        if run_config.is_file() and "quantization_config" not in kwargs:
            cfg = load_config(run_config)  # a QLoRA run answers with the 4-bit base it was trained on
            quant = quantization(cfg.lora, pick_dtype(cfg.model.dtype, torch.device(device or default_device())))
            if quant is not None and cfg.train.stage == 2:
                kwargs.update(quantization_config=quant, device_map=kwargs.get("device_map", "cpu"))
        model = PhiClipForCausalLM.from_pretrained(where, **kwargs)
        return cls(model, PhiClipProcessor.from_pretrained(where, trust_remote_code=True))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 2048))

    def prompt_ids(self, messages: list[dict[str, str]], with_image: bool) -> list[int]:
        """Render like training: the image placeholder goes at the start of the first user turn."""
        messages = [dict(m) for m in messages]
        if with_image and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages):
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first]["content"] = f"{IMAGE_PLACEHOLDER}\n{messages[first]['content']}"
        if not with_image:
            for m in messages:
                m["content"] = m["content"].replace(IMAGE_PLACEHOLDER, "")
        return encode_prompt(self.tokenizer, messages)

    def prompt_length(self, messages: list[dict[str, str]], with_image: bool) -> int:
        """Positions the prompt takes in the LM: the image counts as the features spliced in for it."""
        return len(self.prompt_ids(messages, with_image)) + (self.n_image_tokens - 1 if with_image else 0)

    def model_inputs(self, conversations: list[list[dict[str, str]]], images: list[Image.Image | None]) -> dict:
        """Left-padded batch; all items must agree on having an image or not."""
        with_image = images[0] is not None
        if any((image is not None) != with_image for image in images):
            raise ValueError("a batch must be all image questions or all text questions")
        rows = [self.prompt_ids(m, with_image) for m in conversations]
        longest = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows], device=self.device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        if with_image:
            pixels = self.processor.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
            inputs["pixel_values"] = pixels["pixel_values"].to(self.device)
        return inputs

    def _generate(self, inputs: dict, settings: GenerationSettings, streamer=None) -> torch.Tensor:
        with self._lock:
            return self.model.generate(
                **inputs, **settings.kwargs(), pad_token_id=self.tokenizer.pad_token_id, streamer=streamer
            )

    def _completion(self, new_ids: list[int], settings: GenerationSettings) -> Completion:
        eos = self.model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        stop = next((i for i, token in enumerate(new_ids) if token in eos), None)
        kept = new_ids if stop is None else new_ids[: stop + 1]
        text = self.tokenizer.decode(kept, skip_special_tokens=True).strip()
        return Completion(text, kept, "length" if stop is None and len(kept) >= settings.max_new_tokens else "stop")

    def complete(
        self,
        conversations: list[list[dict[str, str]]],
        images: list[Image.Image | None],
        settings: GenerationSettings | None = None,
    ) -> list[Completion]:
        settings = settings or GenerationSettings()
        inputs = self.model_inputs(conversations, images)
        out = self._generate(inputs, settings)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._completion(row, settings) for row in new]

    def answer_batch(self, conversations: list[list[dict[str, str]]], images: list[Image.Image | None],
                     settings: GenerationSettings | None = None) -> list[str]:
        return [c.text for c in self.complete(conversations, images, settings)]

    def answer(self, messages: list[dict[str, str]], image: Image.Image | None = None,
               settings: GenerationSettings | None = None) -> str:
        return self.answer_batch([messages], [image], settings)[0]

    def stream(self, messages: list[dict[str, str]], image: Image.Image | None = None,
               settings: GenerationSettings | None = None) -> Stream:
        """Text pieces as tokens are generated (generation runs in a worker thread)."""
        settings = settings or GenerationSettings()
        inputs = self.model_inputs([messages], [image])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outputs: list[torch.Tensor] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                outputs.append(self._generate(inputs, settings, streamer))
            except BaseException as err:  # surfaced to the caller below
                errors.append(err)
                streamer.end()

        def pieces() -> Iterator[str]:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            yield from streamer
            thread.join()
            if errors:
                raise errors[0]
            result.completion = self._completion(outputs[0][0, inputs["input_ids"].shape[1]:].tolist(), settings)

        result = Stream(pieces())
        return result
