"""HF ``Trainer`` with phiclip's checkpoint layout and a separate projector learning rate."""

from __future__ import annotations

import torch
from transformers import Trainer

from train.weights import llava_of, load_trainable, save_trainable


class PhiClipTrainer(Trainer):
    """Checkpoints hold only what is trained (projector, adapter, tower if trained).

    Saving the whole model at every checkpoint would write the frozen (possibly 4-bit) LM
    each time; resuming loads those parts strictly, plus the optimizer, scheduler and RNG
    state that the stock Trainer restores itself.
    """

    def __init__(self, *args, projector_lr: float, save_tower: bool, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.save_tower = save_tower

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            llava = llava_of(self.model)
            projector = {id(p) for p in llava.model.multi_modal_projector.parameters()}
            params = [p for p in self.model.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in params if id(p) in projector], "lr": self.projector_lr},
                {"params": [p for p in params if id(p) not in projector], "lr": self.args.learning_rate},
            ]
            groups = [g for g in groups if g["params"]]
            for group in groups:
                group["weight_decay"] = self.args.weight_decay
            self.optimizer = torch.optim.AdamW(groups, betas=(self.args.adam_beta1, self.args.adam_beta2))
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        save_trainable(self.model, output_dir or self.args.output_dir, with_tower=self.save_tower)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)
