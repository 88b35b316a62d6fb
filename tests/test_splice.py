"""The splicing forward: each <image> token becomes that image's projected features, between the text around it."""

import pytest
import torch

from runtime.config import ModelConfig
from train.build import build_model


@pytest.fixture(scope="module")
def built(tiny_llama_dir, tiny_clip_dir):
    torch.manual_seed(0)
    return build_model(ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir)))


@pytest.mark.parametrize(
    "layer, strategy, expected",
    [(-2, "default", 16), (-2, "full", 17), ([-3, -1], "default", 16), (0, "full", 17)],
)
def test_features_per_image_follow_the_tower(tiny_llama_dir, tiny_clip_dir, layer, strategy, expected):
    """32x32 images, 8x8 patches: 16 patches, plus CLS with "full"; several layers widen the projector input."""
    cfg = ModelConfig(lm=str(tiny_llama_dir), vision=str(tiny_clip_dir), vision_feature_layer=layer,
                      vision_feature_select_strategy=strategy)
    b = build_model(cfg)
    assert b.n_image_tokens == expected
    n_layers = 1 if isinstance(layer, int) else len(layer)
    assert b.model.projector.linear_1.in_features == 32 * n_layers
    ids = torch.tensor([[5, 6, b.processor.image_token_id, 7]])
    out = b.model(input_ids=ids, pixel_values=torch.rand(1, 3, 32, 32))
    assert out.logits.shape[:2] == (1, 3 + expected)


def test_text_around_the_image_keeps_its_embeddings(built):
    model, token = built.model, built.processor.image_token_id
    ids = torch.tensor([[11, 12, token, 13, 14]])
    pixels = torch.rand(1, 3, 32, 32)
    features = model.get_image_features(pixels)
    out = model.splice(ids, features)
    embeds = model.get_input_embeddings()(torch.tensor([[11, 12, 13, 14]]))[0]
    n = features.shape[1]
    spliced = out["inputs_embeds"][0]
    assert spliced.shape[0] == 4 + n
    assert torch.equal(spliced[:2], embeds[:2])
    assert torch.equal(spliced[2:2 + n], features[0])
    assert torch.equal(spliced[2 + n:], embeds[2:])
    assert out["position_ids"][0].tolist() == list(range(4 + n))


def test_labels_are_ignored_exactly_over_image_positions_and_padding(built):
    model, token = built.model, built.processor.image_token_id
    ids = torch.tensor([[11, token, 13, 14], [21, 22, 23, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    labels = torch.tensor([[-100, -100, 13, 14], [-100, 22, 23, -100]])
    features = model.get_image_features(torch.rand(1, 3, 32, 32))
    n = features.shape[1]
    out = model.splice(ids, features, mask, labels)
    assert out["labels"][0].tolist() == [-100] + [-100] * n + [13, 14]
    assert out["labels"][1].tolist() == [-100, 22, 23] + [-100] * n
    assert out["attention_mask"][1].tolist() == [1, 1, 1] + [0] * n
    assert out["attention_mask"][0].sum() == 3 + n


def test_mixed_batch_with_left_padding_equals_rows_alone(built):
    """A text-only row and an image row in one left-padded batch give each row's own logits."""
    model, token = built.model, built.processor.image_token_id
    pixels = torch.rand(1, 3, 32, 32)
    rows = [[11, 12, token, 13], [21, 22]]
    ids = torch.tensor([rows[0], [0, 0] + rows[1]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        alone = [model(input_ids=torch.tensor([rows[0]]), pixel_values=pixels).logits[0],
                 model(input_ids=torch.tensor([rows[1]])).logits[0]]
    assert torch.allclose(batch[0, -alone[0].shape[0]:], alone[0], atol=1e-5)
    assert torch.allclose(batch[1, -alone[1].shape[0]:], alone[1], atol=1e-5)


def test_two_images_in_one_row_take_their_own_features(built):
    model, token = built.model, built.processor.image_token_id
    a, b = torch.zeros(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    ids = torch.tensor([[11, token, 12, token, 13]])
    features = model.get_image_features(torch.cat([a, b]))
    n = features.shape[1]
    spliced = model.splice(ids, features)["inputs_embeds"][0]
    assert torch.equal(spliced[1:1 + n], features[0])
    assert torch.equal(spliced[2 + n:2 + 2 * n], features[1])


@pytest.mark.parametrize("ids, n_pixels, message", [
    ([[11, "img", 12]], 0, r"1 <image> token\(s\) \(row 0: 1\) but no pixel_values"),
    ([[11, 12, 13]], 1, r"pixel_values hold 1 image\(s\) but no row of input_ids has a <image> token"),
    ([[11, "img", 12], [11, "img", "img"]], 2, r"3 <image> token\(s\) \(row 0: 1, row 1: 2\) but pixel_values hold 2"),
])
def test_marker_and_pixel_counts_must_agree(built, ids, n_pixels, message):
    token = built.processor.image_token_id
    ids = torch.tensor([[token if t == "img" else t for t in row] for row in ids])
    pixels = torch.rand(n_pixels, 3, 32, 32) if n_pixels else None
    with pytest.raises(ValueError, match=message):
        built.model(input_ids=ids, pixel_values=pixels)


def test_loss_uses_unshifted_labels_like_the_lm(built):
    """Labels go to the LM's own loss unshifted: for text-only input the loss is the plain LM's."""
    model = built.model
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        ours = model(input_ids=ids, labels=ids).loss
        plain = model.language_model(input_ids=ids, labels=ids).loss
    assert torch.allclose(ours, plain)


def test_meta_device_construction(built):
    from accelerate import init_empty_weights

    from modeling_phiclip import PhiClipForCausalLM

    with init_empty_weights():
        empty = PhiClipForCausalLM(built.model.config)
    assert next(empty.projector.parameters()).device.type == "meta"
    assert empty.projector.linear_1.in_features == built.model.projector.linear_1.in_features
