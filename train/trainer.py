"""HF ``Trainer`` with phiclip's checkpoint layout, a separate projector learning rate, bad images
reported from the data loader's workers, length-grouped batches, a forward cut down to what the
loss reads, and streamed data whose position is saved with each checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from data.dataset import IMAGE_ERRORS, STREAM_STATE, EpochLengthGroupedSampler, LlavaDataset
from data.streaming import StreamingLlavaDataset
from train.loss import loss_only_inputs, reads_boolean_logits_to_keep
from train.weights import load_trainable

logger = logging.getLogger(__name__)
STREAM_STATE_FILE = "stream_state.json"  # in a checkpoint: each process's stream position and report, by rank


class PhiClipTrainer(Trainer):
    """Checkpoints hold only what is trained (projector, adapter, tower if trained).

    Saving the whole model at every checkpoint would write the frozen (possibly 4-bit) LM
    each time; resuming loads those parts strictly, plus the optimizer, scheduler and RNG
    state that the stock Trainer restores itself.
    """

    def __init__(self, *args, projector_lr: float, loss_only_compute: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        lm = self.model.language_model.get_base_model() if self.model.has_adapter else self.model.language_model
        self.loss_only_compute = loss_only_compute and reads_boolean_logits_to_keep(lm)
        if loss_only_compute and not self.loss_only_compute:
            logger.warning("train.loss_only_compute: %s's forward does not take a boolean logits_to_keep; "
                           "training with the stock loss over every position", type(lm).__name__)
        self._tokens_per_image: int | None = None
        self._stream_position: dict | None = None  # after the last streamed batch trained on

    def get_train_dataloader(self) -> DataLoader:
        """A streamed dataset is already this process's part of the stream, in order: its batches are neither
        dispatched from the main process nor split again (what ``accelerator.prepare`` would do)."""
        if not isinstance(self.train_dataset, StreamingLlavaDataset):
            return super().get_train_dataloader()
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          pin_memory=self.args.dataloader_pin_memory)

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self._groups_by_length(dataset):
            # Grouped by the batch of one optimiser step over all processes: every process draws the same
            # order and takes its share of each such batch, as one process with the whole batch would.
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochLengthGroupedSampler(batch, dataset.lengths, self._data_seed)
        return super()._get_train_sampler(train_dataset)

    def _get_eval_sampler(self, eval_dataset):
        """Evaluation keeps its sequential order (and so its loss value) under ``group_by_length``."""
        if self._groups_by_length(eval_dataset):
            return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None
        return super()._get_eval_sampler(eval_dataset)

    def _groups_by_length(self, dataset) -> bool:
        """``group_by_length`` on our dataset, which knows its lengths from tokenizing: transformers' own
        samplers would load every item, decoding every image, just to measure it."""
        return self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, LlavaDataset)

    @property
    def _data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The stock Trainer's optimizer, with the projector's parameters at their own learning rate.

        As in ``Trainer.create_optimizer``: the class and its settings (eps, betas, fused...)
        come from ``args.optim``, and biases and norm weights get no weight decay.
        """
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            projector = {id(p) for p in opt_model.projector.parameters()}
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
            for name, param in opt_model.named_parameters():
                if param.requires_grad:
                    groups.setdefault((id(param) in projector, name in decay), []).append(param)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(
                [
                    {
                        "params": params,
                        "lr": self.projector_lr if in_projector else self.args.learning_rate,
                        "weight_decay": self.args.weight_decay if decays else 0.0,
                    }
                    for (in_projector, decays), params in groups.items()
                ],
                **optimizer_kwargs,
            )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The stock loss; in training, on the batch cut down to what the loss reads (:mod:`train.loss`).

        Images that data loader workers could not decode are recorded here, in the main process.
        """
        position = inputs.pop(STREAM_STATE, None)
        if position is not None:
            self._stream_position = position
        for path, reason in inputs.pop(IMAGE_ERRORS, ()):
            for dataset in (self.train_dataset, self.eval_dataset):
                if isinstance(dataset, LlavaDataset):
                    dataset.exclude_image(path, reason)
        if (self.loss_only_compute and not return_outputs and "labels" in inputs
                and self.label_smoother is None and self.compute_loss_func is None):
            if self._tokens_per_image is None:  # the dataset knows it without running the (maybe sharded) tower
                data = self.train_dataset
                self._tokens_per_image = (data.n_image_tokens if isinstance(data, (LlavaDataset, StreamingLlavaDataset))
                                          else self.model.image_token_count())
            lean = loss_only_inputs(inputs, image_token_id=self.model.config.image_token_id,
                                    tokens_per_image=self._tokens_per_image)
            inputs = inputs if lean is None else lean
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial) -> None:
        """The stock checkpoint; for streamed data, first every process's stream position and report (rank 0
        writes them; the trainer state, written last, marks the checkpoint complete)."""
        if isinstance(self.train_dataset, StreamingLlavaDataset):
            saved = gather_object([self.train_dataset.checkpoint(self._stream_position)])
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / STREAM_STATE_FILE).write_text(json.dumps(saved))
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        # transformers 5 calls _save on every rank: only the one that should save writes.
        self.model.save_pretrained(output_dir or self.args.output_dir, is_main_process=self.args.should_save)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)
