"""Torch dataset and collator for Llava training.

Conversations are tokenized once up front (so over-long or unrenderable records are
counted before training starts). Images are decoded and preprocessed per item, on CPU in
the data loader; the vision tower runs inside the model's forward, on the training device.
An image that fails to decode mid-run is reported and the item replaced by the next good
one, so one bad file never stops a long run.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from train.images import ImageError, ImageResolver, open_image
from train.records import Record, Report
from train.template import IGNORE_INDEX, Encoded, TemplateError, encode_conversation
from train.transforms import transform_answers


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
    image_path: str | None


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        records: list[Record],
        *,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        resolver: ImageResolver,
        image_token: str,
        n_image_tokens: int,
        max_length: int,
        report: Report,
        system_prompt: str | None = None,
        drop_stopwords: bool = False,
        drop_punctuation: bool = False,
    ) -> None:
        self.image_processor = image_processor
        self.report = report
        self.examples: list[Example] = []
        kept = 0
        for record in tqdm(records, desc="tokenizing", unit="rec", leave=False, mininterval=2):
            turns = transform_answers(record.turns, no_stopwords=drop_stopwords, no_punctuation=drop_punctuation)
            if any(t.role == "assistant" and not t.content.strip() for t in turns):
                report.skip(record.source, record.id, "no answer: answer empty after answer transforms")
                continue
            try:
                image_path = str(resolver.resolve(record.image)) if record.image else None
                encoded = encode_conversation(
                    tokenizer,
                    turns,
                    image_token=image_token,
                    n_image_tokens=n_image_tokens if record.image else 0,
                    max_length=max_length,
                    system_prompt=system_prompt,
                )
            except (ImageError, TemplateError) as err:
                report.skip(record.source, record.id, str(err))
                continue
            self.examples.append(Example(record, encoded, image_path))
            kept += 1
        report.n_kept = kept

    def __len__(self) -> int:
        return len(self.examples)

    def pixels(self, path: str) -> torch.Tensor:
        image = open_image(path)
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(len(self.examples)):
            example = self.examples[(index + attempt) % len(self.examples)]
            item: dict[str, Any] = {
                "input_ids": torch.tensor(example.encoded.input_ids),
                "labels": torch.tensor(example.encoded.labels),
            }
            if example.image_path is None:
                return item
            try:
                item["pixel_values"] = self.pixels(example.image_path)
                return item
            except ImageError as err:
                self.report.skip(example.record.source, example.record.id, str(err))
        raise RuntimeError("no example in the dataset has a readable image")


@dataclass
class Collator:
    """Right-pads a batch; labels pad with -100; images of the batch are stacked in order."""

    pad_token_id: int

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
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
            batch["pixel_values"] = torch.stack(pixels)
        return batch
