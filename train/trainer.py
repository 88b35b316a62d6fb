"""HF ``Trainer`` with phiclip's checkpoint layout, a separate projector learning rate, and bad images
reported from the data loader's workers."""

from __future__ import annotations

import torch
from transformers import Trainer

from train.dataset import IMAGE_ERRORS, LlavaDataset
from train.weights import load_trainable


class PhiClipTrainer(Trainer):
    """Checkpoints hold only what is trained (projector, adapter, tower if trained).

    Saving the whole model at every checkpoint would write the frozen (possibly 4-bit) LM
    each time; resuming loads those parts strictly, plus the optimizer, scheduler and RNG
    state that the stock Trainer restores itself.
    """

    def __init__(self, *args, projector_lr: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr

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

    def compute_loss(self, model, inputs, *args, **kwargs):
        """Images that data loader workers could not decode are recorded here, in the main process."""
        for path, reason in inputs.pop(IMAGE_ERRORS, ()):
            for dataset in (self.train_dataset, self.eval_dataset):
                if isinstance(dataset, LlavaDataset):
                    dataset.exclude_image(path, reason)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        self.model.save_pretrained(output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)
