"""Torch dataset and collator for Llava training.

Conversations are tokenized once up front (so over-long or unrenderable records are
counted before training starts). Images are decoded and preprocessed per item, on CPU in
the data loader; the vision tower runs inside the model's forward, on the training device.
An image that fails to decode mid-run is reported and the item replaced by the next good
one, so one bad file never stops a long run. The report lives in the main process: a data
loader worker that meets a bad image sends it along with the batch (``IMAGE_ERRORS``), and
the trainer hands it to :meth:`LlavaDataset.exclude_image`, so it is reported once and the
next epoch's workers skip it without opening it again. :class:`Encoder` holds what turns a record
into an example and an example into a training item, for this dataset and the streamed one
(:mod:`data.streaming`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info
from tqdm.auto import tqdm
from transformers.trainer_pt_utils import LengthGroupedSampler

from data.images import ImageResolver, RowImage
from data.records import BadRecord, Record, Report
from data.template import IGNORE_INDEX, Encoded, TemplateError, encode_conversation
from data.transforms import english_stopwords, transform_answers
from modeling_phiclip import PhiClipForCausalLM
from processing_phiclip import ImageError, PhiClipProcessor

IMAGE_ERRORS = "image_errors"  # batch key: (image path, reason) of images a worker could not decode
STREAM_STATE = "stream_state"  # batch key: where a streamed dataset stands after the batch's last example


def in_validation(record_id: str, fraction: float) -> bool:
    """Deterministic split by id hash: the same records are held out in every round."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Example:
    record: Record
    encoded: Encoded
    images: list[Any]  # file paths (resolved) or embedded images, one per image token kept

    @property
    def image_keys(self) -> list[str]:
        """How a bad image is remembered: its path, or the record's id and image index when embedded."""
        return [img if isinstance(img, str) else f"{self.record.where} image {i}" for i, img in enumerate(self.images)]


@dataclass
class Encoder:
    """Tokenizes a record into an :class:`Example` and prepares its images, as training takes them."""

    processor: PhiClipProcessor
    resolver: ImageResolver
    n_image_tokens: int
    max_length: int
    system_prompt: str | None = None
    stopwords: frozenset[str] | None = None
    no_punctuation: bool = False

    def encode(self, record: Record) -> Example:
        """The record's example: answer transforms applied, tokenized, file names resolved (embedded images stay
        as they are). Raises :class:`BadRecord` with the reason it cannot train."""
        turns = transform_answers(record.turns, stopwords=self.stopwords, no_punctuation=self.no_punctuation)
        if any(t.role == "assistant" and not t.content.strip() for t in turns):
            raise BadRecord("no answer: answer empty after answer transforms")
        try:
            encoded = encode_conversation(self.processor, turns, n_image_tokens=self.n_image_tokens,
                                          max_length=self.max_length, system_prompt=self.system_prompt)
            images = [str(self.resolver.resolve(img)) if isinstance(img, str) else img
                      for img in record.images[: encoded.n_images]]
        except (ImageError, TemplateError) as err:
            raise BadRecord(str(err)) from err
        return Example(record, encoded, images)

    def pixels(self, image: Any) -> torch.Tensor:
        """``(1, 3, H, W)`` pixel values of one of an example's images; raises :class:`ImageError`."""
        return self.processor.image_pixels([image.read() if isinstance(image, RowImage) else image])

    @staticmethod
    def item(example: Example, pixels: list[torch.Tensor]) -> dict[str, Any]:
        """The training item: ids, labels and the example's images' pixel values ``(n_images, 3, H, W)``."""
        item: dict[str, Any] = {
            "input_ids": torch.tensor(example.encoded.input_ids),
            "labels": torch.tensor(example.encoded.labels),
        }
        if pixels:
            item["pixel_values"] = torch.cat(pixels)
        return item


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        records: list[Record],
        *,
        processor: PhiClipProcessor,
        resolver: ImageResolver,
        n_image_tokens: int,
        max_length: int,
        report: Report,
        system_prompt: str | None = None,
        drop_stopwords: bool = False,
        drop_punctuation: bool = False,
    ) -> None:
        self.processor = processor
        self.n_image_tokens = n_image_tokens
        self.report = report
        self.encoder = Encoder(processor, resolver, n_image_tokens, max_length, system_prompt,
                               english_stopwords() if drop_stopwords else None, drop_punctuation)
        self.examples: list[Example] = []
        self.bad_images: dict[str, str] = {}  # image key (see Example.image_keys) -> why it cannot be used
        kept = 0
        for record in tqdm(records, desc="tokenizing", unit="rec", leave=False, mininterval=2):
            try:
                self.examples.append(self.encoder.encode(record))
            except BadRecord as err:
                report.skip(record.source, record.id, str(err))
                continue
            kept += 1
        report.n_kept = kept

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """LM positions of each example (an image counts as its features), known without opening an image."""
        return [PhiClipForCausalLM.spliced_length(len(e.encoded.input_ids), len(e.images), self.n_image_tokens)
                for e in self.examples]

    def exclude_image(self, key: str, reason: str) -> None:
        """Skip the examples showing this image from now on; each is reported once (in this process's report)."""
        if key in self.bad_images:
            return
        self.bad_images[key] = reason
        for example in self.examples:
            if key in example.image_keys:
                self.report.skip(example.record.source, example.record.id, reason)
                self.report.n_kept -= 1

    def __getitem__(self, index: int) -> dict[str, Any]:
        failed: list[tuple[str, str]] = []
        for attempt in range(len(self.examples)):
            example = self.examples[(index + attempt) % len(self.examples)]
            keys = example.image_keys
            if any(key in self.bad_images for key in keys):
                continue
            pixels = []
            for key, image in zip(keys, example.images):
                try:
                    pixels.append(self.encoder.pixels(image))  # (1, 3, H, W)
                except ImageError as err:
                    self.exclude_image(key, str(err))
                    if get_worker_info() is not None:  # a worker's copy: the main process must hear of it too
                        failed.append((key, str(err)))
                    break
            if len(pixels) < len(keys):
                continue
            item = self.encoder.item(example, pixels)
            if failed:
                item[IMAGE_ERRORS] = failed
            return item
        raise RuntimeError("no example in the dataset has a readable image")


@dataclass
class Collator:
    """Right-pads a batch; labels pad with -100; images of the batch are stacked in order."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        longest = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        pixels = [item["pixel_values"] for item in items if "pixel_values" in item]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)  # images in row order, as the splice takes them
        failed = [error for item in items for error in item.get(IMAGE_ERRORS, ())]
        if failed:
            batch[IMAGE_ERRORS] = failed
        if STREAM_STATE in items[-1]:
            batch[STREAM_STATE] = items[-1][STREAM_STATE]
        return batch


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped order (shuffled, then sorted by length within groups of batches), drawn
    from ``seed`` and the epoch, so that a resumed run and every process see the same order."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch."""
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()
