"""What ``train_throughput.py`` measures inside each training worker: step times, losses, tokens and LM positions."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
from transformers import TrainerCallback

from modeling_phiclip import PhiClipForCausalLM


class Probe(TrainerCallback):
    """Step wall times, logged losses, the tokens of every training batch and the LM positions it took."""

    def __init__(self, image_tokens: int) -> None:
        self.image_tokens = image_tokens  # LM positions one image token in input_ids takes (1: already expanded)
        self.image_token_id: int | None = None
        self.ends: list[float] = []
        self.losses: list[float] = []
        self.batches: list[tuple[int, int, int]] = []  # (rows, real tokens, supervised tokens) as collated
        self.forwards: list[tuple[int, int]] = []  # (rows, LM positions = rows x longest row) of each training forward
        self.first_batch: dict[str, Any] = {}
        self.initial_loss = self.first_batch_loss = float("nan")

    def lengths(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Each row's LM positions: its tokens, an image counting as its features."""
        images = ids == self.image_token_id
        if mask is None:
            return PhiClipForCausalLM.spliced_length(ids.shape[1], images.sum(1), self.image_tokens)
        return PhiClipForCausalLM.spliced_length(mask.sum(1), (images & mask.bool()).sum(1), self.image_tokens)

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs) -> None:
        """The untrained model's loss on the data's first batch (the same samples for every tool), then start timing."""
        collate = train_dataloader.collate_fn
        data, batch_size = train_dataloader.dataset, args.per_device_train_batch_size
        with torch.no_grad():
            self.initial_loss = float(model(**collate([data[i] for i in range(batch_size)])).loss)

        def counting_collate(items):
            batch = collate(items)
            self.first_batch = self.first_batch or batch  # (the loader fetches a batch ahead)
            real = int(self.lengths(batch["input_ids"], batch["attention_mask"]).sum())
            self.batches.append((len(items), real, int((batch["labels"][:, 1:] != -100).sum())))
            return batch

        getattr(train_dataloader, "base_dataloader", train_dataloader).collate_fn = counting_collate  # accelerate's
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        self.ends.append(time.perf_counter())

    def _forward(self, module, args, kwargs) -> None:
        if not module.training:
            return
        if not self.forwards:  # the first step: model(**batch).loss on its batch, to hold the logged loss against
            batch = {k: v for k, v in self.first_batch.items() if k in ("input_ids", "attention_mask", "pixel_values",
                                                                       "labels")}
            with torch.no_grad():
                self.first_batch_loss = float(module.forward(**batch).loss)
        ids = kwargs["input_ids"]
        self.forwards.append((ids.shape[0], ids.shape[0] * int(self.lengths(ids, kwargs.get("attention_mask")).max())))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))

    def result(self, warmup: int, lm_params: int) -> dict[str, Any]:
        steps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        rows = sum(t[0] for t in self.batches)
        return {
            "step_times": steps[warmup:],
            "initial_loss": self.initial_loss,
            "first_batch_loss": self.first_batch_loss,
            "losses": self.losses,
            "real": sum(t[1] for t in self.batches) / rows,
            "padded": sum(t[1] for t in self.forwards) / sum(t[0] for t in self.forwards),  # the loader fetches ahead
            "supervised": sum(t[2] for t in self.batches) / rows,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "lm_params": lm_params,
        }


def lm_parameters(model) -> int:
    """Parameters of the base LM (tied embeddings counted once, LoRA excluded)."""
    return sum(p.numel() for n, p in model.language_model.named_parameters() if "lora_" not in n)
