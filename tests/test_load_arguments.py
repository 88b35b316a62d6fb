"""PhiClipForCausalLM.from_pretrained takes what transformers hands it: download arguments reach every file,
model arguments are honoured, only what would change the model and cannot be honoured is refused by name."""

from __future__ import annotations

import shutil
from unittest import mock

import pytest
import torch

from modeling_phiclip import REFUSED_ARGUMENTS, PhiClipForCausalLM


@pytest.fixture(scope="module")
def folder(tiny_run):
    return tiny_run / "model"


def _logits(model: PhiClipForCausalLM) -> torch.Tensor:
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_what_the_auto_classes_and_pipelines_pass_is_accepted(folder, tmp_path):
    """transformers 5.25 passes ``proxies`` (and 4.x/5.x the rest); before, every one was an 'unexpected argument'."""
    plain = PhiClipForCausalLM.from_pretrained(folder)
    given = PhiClipForCausalLM.from_pretrained(
        folder, proxies=None, token=None, cache_dir=str(tmp_path), local_files_only=True, force_download=False,
        revision=None, subfolder="", trust_remote_code=True, code_revision=None, adapter_kwargs={}, _from_auto=True,
        _from_pipeline="image-text-to-text", _commit_hash=None, output_loading_info=False, low_cpu_mem_usage=True,
        use_safetensors=True, weights_only=True, gguf_file=None, variant=None,
    )
    torch.testing.assert_close(_logits(given), _logits(plain), atol=0, rtol=0)


def test_download_arguments_reach_the_base_lm_and_the_tower_but_not_revision(folder, tmp_path):
    from transformers import AutoModelForCausalLM

    import modeling_phiclip

    tower_class = modeling_phiclip.vision_tower_class(modeling_phiclip.PhiClipConfig.from_pretrained(folder))
    lm_load, tower_load = AutoModelForCausalLM.from_pretrained, tower_class.from_pretrained
    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", wraps=lm_load) as lm, \
            mock.patch.object(tower_class, "from_pretrained", wraps=tower_load) as tower:
        PhiClipForCausalLM.from_pretrained(folder, proxies={"https": "http://127.0.0.1:9"}, cache_dir=str(tmp_path),
                                           token="hf_dummy", local_files_only=True, revision="abc123",
                                           device_map="cpu")
    for call in (lm.call_args, tower.call_args):
        assert call.kwargs["proxies"] == {"https": "http://127.0.0.1:9"}
        assert call.kwargs["cache_dir"] == str(tmp_path) and call.kwargs["token"] == "hf_dummy"
        assert call.kwargs["local_files_only"] is True
        assert call.kwargs["revision"] is None  # the base's own revision from the config, never PhiClip's commit
    assert lm.call_args.kwargs["device_map"] == "cpu" and "device_map" not in tower.call_args.kwargs


@pytest.mark.parametrize("key", sorted(REFUSED_ARGUMENTS))
def test_settings_that_would_change_the_model_are_refused_by_name(folder, key):
    with pytest.raises(TypeError, match=f"'{key}' is not supported"):
        PhiClipForCausalLM.from_pretrained(folder, **{key: "x" if key != "ignore_mismatched_sizes" else True})


def test_a_config_attribute_overrides_the_saved_config(folder):
    model = PhiClipForCausalLM.from_pretrained(folder, text_only_base_lm=False)
    assert model.config.text_only_base_lm is False


def test_an_argument_no_one_knows_is_refused_by_the_base_lms_loader(folder):
    with pytest.raises(TypeError, match="brand_new_knob"):
        PhiClipForCausalLM.from_pretrained(folder, brand_new_knob=3)


def test_subfolder_locates_the_model_inside_a_repository(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "repo" / "phiclip")
    model = PhiClipForCausalLM.from_pretrained(tmp_path / "repo", subfolder="phiclip")
    torch.testing.assert_close(_logits(model), _logits(PhiClipForCausalLM.from_pretrained(folder)), atol=0, rtol=0)


def test_generation_config_given_is_used(folder):
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=3, do_sample=False)
    assert PhiClipForCausalLM.from_pretrained(folder, generation_config=config).generation_config is config
