"""Answer questions with a PhiClip model: batches, streaming, and prompts rendered exactly as in training.

The model routes by itself: a question with an image goes through the fine-tuned model,
one without (typed or spoken text) through the base LM with the adapter disabled (the same
weights, no second copy), unless the model's config turns that off.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import torch
from transformers import AutoConfig

from chat.own_code import check_own_code
from chat.rows import generate_rows
from chat.settings import Completion, GenerationSettings, Sink, TokenLogprob
from configuration_phiclip import PhiClipConfig
from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import IMAGE_PART_TYPES, PhiClipProcessor
from runtime.config import load_config
from runtime.devices import default_device, pick_dtype, quantization
from runtime.rundir import model_dir

__all__ = ["Completion", "GenerationSettings", "Prompt", "Stream", "TokenLogprob", "VisionChat", "locate"]


@dataclass(frozen=True)
class Prompt:
    """A conversation prepared once for generation: the length check, the batcher and ``generate()`` all use it.

    ``ids``: the prompt's token ids, one ``<image>`` per image (rendered as in training); ``images``: the
    conversation's images, in order; ``length``: the LM positions it takes once each image's features are
    spliced in (:meth:`PhiClipForCausalLM.spliced_length`).
    """

    ids: list[int]
    images: list[Any]
    length: int


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


def load_parts(source: str | Path, **kwargs) -> tuple[PhiClipForCausalLM, PhiClipProcessor]:
    """Model and processor from a run directory, a PhiClip folder or a Hub repo id, with PhiClip's own code only.

    A Hub repo is downloaded first, then checked like a folder: configs that ask for other code are
    refused (:func:`chat.own_code.check_own_code`) and nothing loads with ``trust_remote_code``.
    ``kwargs`` go to ``PhiClipForCausalLM.from_pretrained``.
    """
    where = locate(source)
    if not Path(where).is_dir():
        from huggingface_hub import snapshot_download

        where = snapshot_download(where, revision=kwargs.pop("revision", None))
    check_own_code(where)
    model = PhiClipForCausalLM.from_pretrained(where, trust_remote_code=False, **kwargs)
    # AutoTokenizer reads config.json to pick a tokenizer class: without PhiClip's config registered
    # it falls back to a bare config and warns that a `phiclip` model is loaded as another type
    AutoConfig.register(PhiClipConfig.model_type, PhiClipConfig, exist_ok=True)
    return model, PhiClipProcessor.from_pretrained(where, trust_remote_code=False)


def _image_list(images: Any) -> list[Any]:
    """``None`` -> [], one image -> [image], a list stays a list."""
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


class VisionChat:
    """A loaded model: ``answer()``/``stream()`` for one conversation, ``complete()``/``answer_batch()`` for many.

    A conversation is a list of messages whose content is a string or a list of parts
    (``{"type": "image"}``, ``{"type": "text", "text": ...}``); its images come separately, one per
    image part, in order (anything :func:`processing_phiclip.open_image` reads). Images given with a
    conversation that has no image parts go first in its first user turn, as in LLaVA's data.
    With ``image_markers=True`` (LLaVA records, as evaluation reads them), ``<image>`` in a user
    turn's string is an image slot; otherwise message text is always text.
    """

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
        if device is not None:
            kwargs.setdefault("device_map", str(device))
        run_config = Path(source) / "config.yaml"
        if run_config.is_file() and "quantization_config" not in kwargs:
            cfg = load_config(run_config)  # a QLoRA run answers with the 4-bit base it was trained on
            quant = quantization(cfg.lora, pick_dtype(cfg.model.dtype, torch.device(device or default_device())))
            if quant is not None and cfg.train.stage == 2:
                kwargs.update(quantization_config=quant, device_map=kwargs.get("device_map", "cpu"))
        return cls(*load_parts(source, **kwargs))

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config.text_config, "max_position_embeddings", 2048))

    def with_images(self, messages: list[dict], n_images: int, image_markers: bool = False) -> list[dict]:
        """``messages`` with one image slot per image: as they are if they hold that many, else the images
        go first in the first user turn. Raises ``ValueError`` when the counts cannot agree."""
        slots = sum(self._slots(m, image_markers) for m in messages)
        if slots == n_images:
            return messages
        if slots:
            raise ValueError(f"the conversation has {slots} image slot(s) but {n_images} image(s) came with it")
        messages = [dict(m) for m in messages]
        first = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
        if first is None:
            raise ValueError("a conversation with images needs a user message")
        content = messages[first].get("content") or ""
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        messages[first]["content"] = [{"type": "image"} for _ in range(n_images)] + parts
        return messages

    def _slots(self, message: dict, image_markers: bool) -> int:
        content = message.get("content")
        if isinstance(content, list):
            return sum(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content)
        if image_markers and message.get("role") == "user" and isinstance(content, str):
            return content.count(self.processor.image_token)
        return 0

    def prompt_ids(self, messages: list[dict], n_images: int = 0, image_markers: bool = False) -> list[int]:
        """The prompt's ids, rendered and tokenized as in training (see :meth:`PhiClipProcessor.encode_chat`)."""
        messages = self.with_images(messages, n_images, image_markers)
        return self.processor.encode_chat(messages, add_generation_prompt=True, image_markers=image_markers)[0]

    def prompt(self, messages: list[dict], images: Any = None, image_markers: bool = False) -> Prompt:
        """``messages`` and their images (None, one, or a list) prepared once (see :class:`Prompt`)."""
        images = _image_list(images)
        ids = self.prompt_ids(messages, len(images), image_markers)
        return Prompt(ids, images, self.model.spliced_length(len(ids), len(images), self.n_image_tokens))

    def prompt_length(self, messages: list[dict], n_images: int = 0, image_markers: bool = False) -> int:
        """Positions the prompt takes in the LM: each image counts as the features spliced in for it."""
        return self.prompt(messages, [None] * n_images, image_markers).length

    def prompts(self, conversations: list[list[dict]], images: list[Any], image_markers: bool = False) -> list[Prompt]:
        """One :class:`Prompt` per conversation; ``images[i]``: conversation i's images (a list, one image, or None)."""
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} image lists for {len(conversations)} conversations")
        return [self.prompt(m, row, image_markers) for m, row in zip(conversations, images)]

    def batch(self, prompts: Sequence[Prompt]) -> dict:
        """Left-padded batch: ``input_ids``, ``attention_mask`` (rows, longest) and, with images, ``pixel_values``
        (images, 3, H, W). A batch may mix image and text-only prompts: ``generate()`` answers each row by its
        own route, as it would alone."""
        longest = max(len(p.ids) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (longest - len(p.ids)) + p.ids for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (longest - len(p.ids)) + [1] * len(p.ids) for p in prompts], device=self.device)
        inputs = {"input_ids": ids, "attention_mask": mask}
        flat = [image for p in prompts for image in p.images]
        if flat:
            inputs["pixel_values"] = self.processor.image_pixels(flat).to(self.device)
        return inputs

    def model_inputs(self, conversations: list[list[dict]], images: list[Any], image_markers: bool = False) -> dict:
        """:meth:`batch` of the conversations' :meth:`prompts`."""
        return self.batch(self.prompts(conversations, images, image_markers))

    def _generate(
        self,
        inputs: dict,
        settings: Sequence[GenerationSettings],
        sinks: Sequence[Sink | None] | None = None,
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> list[Completion]:
        """One generate() call in which each row keeps its own settings (:func:`chat.rows.generate_rows`)."""
        with self._lock:
            return generate_rows(
                self.model, self.tokenizer, inputs, settings, sinks, cancelled, image_tokens=self.n_image_tokens
            )

    def complete(
        self,
        conversations: list[list[dict]],
        images: list[Any],
        settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
        image_markers: bool = False,
        *,
        sinks: Sequence[Sink | None] | None = None,
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> list[Completion]:
        """One answer per conversation, all in one generate() call (:meth:`complete_prompts` of their prompts)."""
        prompts = self.prompts(conversations, images, image_markers)
        return self.complete_prompts(prompts, settings, sinks=sinks, cancelled=cancelled)

    def complete_prompts(
        self,
        prompts: Sequence[Prompt],
        settings: GenerationSettings | Sequence[GenerationSettings] | None = None,
        *,
        sinks: Sequence[Sink | None] | None = None,
        cancelled: Sequence[threading.Event | None] | None = None,
    ) -> list[Completion]:
        """One answer per prepared prompt, all in one generate() call.

        ``settings``: one for every row, or a list with row i's own (stop strings, seed,
        penalties, logprobs ... see :class:`GenerationSettings`). ``sinks[i]`` receives row i's
        text as it is generated; setting ``cancelled[i]`` ends row i early (the others go on). Prompts with
        images and text-only prompts may be mixed: each route is generated in a call of its own.
        """
        settings = settings or GenerationSettings()
        if isinstance(settings, GenerationSettings):
            settings = [settings] * len(prompts)
        routes = [[i for i, p in enumerate(prompts) if p.images], [i for i, p in enumerate(prompts) if not p.images]]
        if not all(routes):
            return self._generate(self.batch(prompts), settings, sinks, cancelled)
        # Image rows and text-only rows take different routes: one generate() call each, answers in order.
        out: list[Completion | None] = [None] * len(prompts)
        for rows in routes:
            done = self._generate(self.batch([prompts[i] for i in rows]), [settings[i] for i in rows],
                                  [sinks[i] for i in rows] if sinks else None,
                                  [cancelled[i] for i in rows] if cancelled else None)
            for i, completion in zip(rows, done):
                out[i] = completion
        return out

    def answer_batch(self, conversations: list[list[dict]], images: list[Any],
                     settings: GenerationSettings | None = None, image_markers: bool = False) -> list[str]:
        return [c.text for c in self.complete(conversations, images, settings, image_markers)]

    def answer(self, messages: list[dict], images: Any = None, settings: GenerationSettings | None = None) -> str:
        """One answer; ``images``: None, one image, or a list (see the class docstring)."""
        return self.answer_batch([messages], [images], settings)[0]

    def stream(self, messages: list[dict], images: Any = None, settings: GenerationSettings | None = None) -> Stream:
        """Text pieces as tokens are generated (generation runs in a worker thread).

        Text that could still become one of the settings' stop strings is held back until it
        cannot; the stop string itself is never sent.
        """
        settings = settings or GenerationSettings()
        inputs = self.model_inputs([messages], [images])
        inbox: SimpleQueue = SimpleQueue()
        errors: list[BaseException] = []

        def work() -> None:
            try:
                result.completion = self._generate(inputs, [settings], [lambda piece, _: inbox.put(piece)])[0]
            except BaseException as err:  # surfaced to the caller below
                errors.append(err)
            finally:
                inbox.put(None)

        def pieces() -> Iterator[str]:
            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            while (piece := inbox.get()) is not None:
                if piece:
                    yield piece
            thread.join()
            if errors:
                raise errors[0]

        result = Stream(pieces())
        return result
