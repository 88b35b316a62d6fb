"""Configs: YAML + command-line overrides, strict about unknown keys; shipped configs load."""

from pathlib import Path

import pytest

from runtime.config import ConfigError, RunConfig, load_config

CONFIGS = Path(__file__).parent.parent / "train" / "configs"


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  lm: some/lm\ntrain:\n  epochs: 1\n")
    cfg = load_config(path, ["train.epochs=2.5", "model.vision_feature_layer=[-2, -1]", "lora.quantize=nf4"])
    assert cfg.model.lm == "some/lm"
    assert cfg.train.epochs == 2.5
    assert cfg.model.vision_feature_layer == [-2, -1]
    assert cfg.lora.quantize == "nf4"


def test_unknown_keys_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epoch: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml.train: unknown key 'epoch'"):
        load_config(path)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.epochs"])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["data.drop_stopwords=true"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, RunConfig)
    assert cfg.train.stage in (1, 2)


def test_reference_and_original_recipes():
    stage1 = load_config(CONFIGS / "reference-stage1.yaml")
    stage2 = load_config(CONFIGS / "reference-stage2.yaml")
    original = load_config(CONFIGS / "original.yaml")
    assert stage1.model.lm == stage2.model.lm == original.model.lm == "microsoft/Phi-3.5-mini-instruct"
    assert stage1.model.vision == "openai/clip-vit-large-patch14-336"
    assert stage2.lora.quantize == "nf4" and stage2.train.continue_from == stage1.train.output_dir
    assert original.model.vision == "openai/clip-vit-base-patch32" and original.lora.r == 64


def test_values_are_type_checked(tmp_path):
    cfg = load_config(None, ["train.learning_rate=1e-3", "train.epochs=3"])
    assert cfg.train.learning_rate == 0.001 and isinstance(cfg.train.epochs, float)
    with pytest.raises(ConfigError, match=r"config.train.batch_size: expected int, got 'many'"):
        load_config(None, ["train.batch_size=many"])
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: expected bool"):
        load_config(None, ["train.gradient_checkpointing=3"])


def test_model_config_reaches_phiclip_config_through_one_mapping():
    """Every ModelConfig field is either carried into PhiClipConfig by PHICLIP_FIELDS or named as a load-time one."""
    import dataclasses
    import inspect

    from configuration_phiclip import PhiClipConfig
    from runtime.config import PHICLIP_FIELDS, ModelConfig

    accepted = set(inspect.signature(PhiClipConfig.__init__).parameters)
    assert set(PHICLIP_FIELDS.values()) <= accepted
    load_time = {"lm", "vision", "image_aspect", "dtype", "attn_implementation"}
    assert {f.name for f in dataclasses.fields(ModelConfig)} == set(PHICLIP_FIELDS) | load_time
    cfg = ModelConfig(lm_revision="abc", vision_feature_layer=[-2, -1], image_features="pooled")
    built = PhiClipConfig(**cfg.phiclip_fields())
    assert (built.text_revision, built.vision_feature_layer, built.image_features) == ("abc", [-2, -1], "pooled")
