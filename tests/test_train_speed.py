"""The training path's speedups change no loss value: the trainer's loss, computed on the batch cut down
to what it reads, against ``model(**batch).loss``, and its gradients, on batches with image and text
rows and padding (left-padded batches take the stock path);
length-grouped batches take every example once per epoch, in a seeded order, without opening images."""

from __future__ import annotations

import pytest
import torch
from helpers import make_toy_data, tiny_config
from transformers import LlamaForCausalLM, TrainingArguments

import processing_phiclip
from data.dataset import Collator, EpochLengthGroupedSampler, LlavaDataset
from data.images import ImageResolver
from data.sources import read_records
from data.template import IGNORE_INDEX
from train.loss import reads_boolean_logits_to_keep
from train.run import prepare_model
from train.trainer import PhiClipTrainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir, tiny_clip_dir):
    """A stage-2 model with a LoRA adapter that is not a no-op, its trainer, and the toy data's examples."""
    root = tmp_path_factory.mktemp("speed")
    data = make_toy_data(root)
    cfg = tiny_config(tiny_llama_dir, tiny_clip_dir, data, root / "run")
    built = prepare_model(cfg, torch.device("cpu"))
    model = built.model
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    records, report = read_records(data[0])
    dataset = LlavaDataset(records, processor=built.processor,
                           resolver=ImageResolver(data[1]), n_image_tokens=built.n_image_tokens,
                           max_length=128, report=report)
    args = TrainingArguments(output_dir=str(root / "out"), use_cpu=True, report_to="none")
    trainer = PhiClipTrainer(model=model, args=args, projector_lr=1e-3)
    return model, trainer, dataset, Collator(built.tokenizer.pad_token_id)


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same rows, padding moved to the left."""
    out = dict(batch)
    lengths = batch["attention_mask"].sum(1)
    for key in ("input_ids", "labels", "attention_mask"):
        out[key] = torch.stack([row.roll(int(row.numel() - n)) for row, n in zip(batch[key], lengths)])
    return out


def batch_of(setup, indices: list[int], padding: str = "right") -> dict[str, torch.Tensor]:
    _, _, dataset, collate = setup
    batch = collate([dataset[i] for i in indices])
    return left_padded(batch) if padding == "left" else batch


def loss_and_grads(model, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """The loss and each trainable parameter's gradient (None where it gets none: the projector, for text)."""
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    return loss.detach(), grads


# The toy data's last record (index 12) has no image; 0, 3 and 12 have answers of different lengths.
BATCHES = {
    "images and a text row, right padding": ([0, 12, 3, 7], "right"),
    "images and a text row, left padding": ([0, 12, 3, 7], "left"),
    "images only, no padding": ([1, 1], "right"),
    "text only": ([12, 12], "right"),
}


@pytest.mark.parametrize("items", [None, 37])
@pytest.mark.parametrize("case", BATCHES)
def test_training_loss_equals_the_full_loss(setup, case, items):
    """Loss and every trainable parameter's gradient, with and without the Trainer's num_items_in_batch."""
    model, trainer, _, _ = setup
    model.train()
    indices, padding = BATCHES[case]
    batch = batch_of(setup, indices, padding)
    if case.startswith("images and a text row"):
        assert batch["pixel_values"].shape[0] == 3 and (batch["attention_mask"] == 0).any()
    kwargs = {} if items is None else {"num_items_in_batch": torch.tensor(items)}

    expected, expected_grads = loss_and_grads(model, lambda: model(**batch, **kwargs).loss)
    loss, grads = loss_and_grads(model, lambda: trainer.compute_loss(model, dict(batch), **kwargs))

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    assert grads.keys() == expected_grads.keys() and any("lora_A" in n for n in grads)
    for name, grad in grads.items():
        if grad is None or expected_grads[name] is None:
            assert grad is expected_grads[name] and "projector" in name and case == "text only", name
        else:
            # Float noise scales with the tensor (the masked and the causal attention kernels round differently):
            # compare each element against 1e-5 of the tensor's largest gradient.
            scale = float(expected_grads[name].abs().max())
            torch.testing.assert_close(grad, expected_grads[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_only_what_the_loss_reads_is_computed(setup):
    """The head sees one row per supervised token, and the LM no column after a row's last answer."""
    model, trainer, _, _ = setup
    batch = batch_of(setup, [0, 12, 3, 7])
    head_rows, lm_lengths = [], []
    hooks = [
        model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_rows.append(args[0].shape)),
        model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: lm_lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            trainer.compute_loss(model, dict(batch))
            full = model(**batch)
    finally:
        for hook in hooks:
            hook.remove()
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert head_rows[0] == (supervised, model.config.text_config.hidden_size)
    assert head_rows[1][:2] == full.logits.shape[:2] and head_rows[1][1] > supervised
    last_answer_end = max(int((row != IGNORE_INDEX).nonzero().max()) for row in batch["labels"])
    assert lm_lengths[0] == lm_lengths[1] - (batch["input_ids"].shape[1] - last_answer_end)


class IntOnlyLogitsLlama(LlamaForCausalLM):
    """An LM as older or remote code writes it: ``logits_to_keep`` may only be an int."""

    def forward(self, *args, logits_to_keep: int = 0, **kwargs):
        if not isinstance(logits_to_keep, int):
            raise TypeError(f"logits_to_keep must be an int, got {type(logits_to_keep).__name__}")
        return super().forward(*args, logits_to_keep=logits_to_keep, **kwargs)


def test_an_lm_without_boolean_logits_to_keep_trains_on_the_stock_loss(setup, tmp_path, caplog):
    """Such an LM is detected up front: a warning names it, and the loss is model(**batch).loss."""
    model, trainer, _, _ = setup
    lm = model.language_model.get_base_model()
    assert trainer.loss_only_compute and reads_boolean_logits_to_keep(lm)
    batch = batch_of(setup, [0, 12, 3, 7])
    lm.__class__ = IntOnlyLogitsLlama
    try:
        assert not reads_boolean_logits_to_keep(lm)
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        with caplog.at_level("WARNING", logger="train.trainer"):
            fallback = PhiClipTrainer(model=model, args=args, projector_lr=1e-3)
        assert not fallback.loss_only_compute
        assert "IntOnlyLogitsLlama" in caplog.text and "train.loss_only_compute" in caplog.text
        with torch.no_grad():
            torch.testing.assert_close(fallback.compute_loss(model, dict(batch)), model(**batch).loss)
    finally:
        lm.__class__ = LlamaForCausalLM


def test_length_grouped_order_is_a_seeded_permutation_per_epoch():
    """Every example once per epoch; the same order for the same seed and epoch (a resumed run, every process)."""
    lengths = [int(n) for n in torch.randint(20, 200, (103,), generator=torch.Generator().manual_seed(0))]
    sampler = EpochLengthGroupedSampler(8, lengths, seed=5)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(103)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch1) == list(range(103)) and epoch1 != epoch0
    again = EpochLengthGroupedSampler(8, lengths, seed=5)
    again.set_epoch(1)
    assert list(again) == epoch1
    assert list(EpochLengthGroupedSampler(8, lengths, seed=6)) != epoch0

    def padded(order: list[int]) -> int:
        return sum(8 * max(lengths[i] for i in order[k:k + 8]) for k in range(0, len(order), 8))

    assert padded(epoch0) < 0.8 * padded(list(range(103)))


def test_trainer_groups_by_the_tokenized_lengths_without_opening_images(setup, monkeypatch, tmp_path):
    model, _, dataset, collate = setup
    lengths = [int(item["attention_mask"].sum()) + (dataset.n_image_tokens - 1) * ("pixel_values" in item)
               for item in (collate([dataset[i]]) for i in range(len(dataset)))]

    def no_image(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(processing_phiclip, "open_image", no_image)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                             train_sampling_strategy="group_by_length", seed=1, data_seed=9)
    trainer = PhiClipTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, projector_lr=1e-3)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, EpochLengthGroupedSampler)
    assert sampler.lengths == lengths and sampler.seed == 9
    assert sorted(sampler) == list(range(len(dataset)))
    assert list(trainer._get_eval_sampler(dataset)) == list(range(len(dataset)))  # evaluation order unchanged
