"""PhiClip's own commands run only PhiClip's code: a folder whose configs ask for other code is refused, naming the
file and the class, by chat, serve, eval, export (every format) and push, and nothing of the planted code runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import write_image

PLANTED = '''
from pathlib import Path
Path(__file__).with_name("PLANTED_CODE_RAN").write_text("ran")
from transformers import PreTrainedTokenizerFast, CLIPImageProcessor, ProcessorMixin, PretrainedConfig
class PlantedTokenizer(PreTrainedTokenizerFast):
    pass
class PlantedImageProcessor(CLIPImageProcessor):
    pass
class PlantedConfig(PretrainedConfig):
    model_type = "planted"
'''


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


VARIANTS = {
    "tokenizer auto_map": ("tokenizer_config.json", "planted.PlantedTokenizer",
                           lambda d: d.update(auto_map={"AutoTokenizer": ["planted.PlantedTokenizer", None]})),
    "tokenizer class": ("tokenizer_config.json", "PlantedTokenizer",
                        lambda d: d.update(tokenizer_class="PlantedTokenizer")),
    "processor auto_map": ("processor_config.json", "planted.PlantedProcessor",
                           lambda d: d.update(auto_map={"AutoProcessor": "planted.PlantedProcessor"})),
    "image processor type": ("processor_config.json", "PlantedImageProcessor",
                             lambda d: d["image_processor"].update(image_processor_type="PlantedImageProcessor")),
    "model auto_map": ("config.json", "planted.PlantedConfig",
                       lambda d: d["auto_map"].update(AutoConfig="planted.PlantedConfig")),
}


@pytest.fixture()
def planted(tiny_run, tmp_path):
    """A copy of a trained run whose model folder carries a planted Python file."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "model" / "planted.py").write_text(PLANTED)
    return run


def _commands(run: Path, tmp_path: Path) -> dict:
    import phiclip_cli
    from serve.config import ServeConfig
    from serve.server import load_engine

    data = tmp_path / "eval.json"
    write_image(tmp_path / "img.png", 0)
    data.write_text(json.dumps([{"id": "q", "image": "img.png", "conversations": [
        {"from": "human", "value": "<image>\nIs it bright?"}, {"from": "gpt", "value": "Yes."}]}]))
    return {
        "chat": lambda: phiclip_cli.main(["chat", str(run), "Is it bright?"]),
        "serve": lambda: load_engine(run, ServeConfig(whisper_model=None, ui=False)),
        "eval": lambda: phiclip_cli.main(["eval", str(run), str(data), "--images", str(tmp_path)]),
        "export": lambda: phiclip_cli.main(["export", str(run), str(tmp_path / "llava")]),
        "export gguf": lambda: phiclip_cli.main(["export", str(run), str(tmp_path / "gguf"), "--format", "gguf",
                                                 "--allow-approximate-vision"]),
        "export vllm-lora": lambda: phiclip_cli.main(["export", str(run), str(tmp_path / "lora"),
                                                      "--format", "vllm-lora"]),
        "push": lambda: phiclip_cli.main(["push", str(run), "someone/planted"]),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_code_never_runs(planted, tmp_path, capsys, variant):
    from chat.own_code import ForeignCodeError

    file, asked, change = VARIANTS[variant]
    _edit(planted / "model" / file, change)
    for name, command in _commands(planted, tmp_path).items():
        try:
            code = command()
        except ForeignCodeError as err:
            message = str(err)
        else:
            assert code == 2, (variant, name)
            message = capsys.readouterr().err
        assert file in message and asked in message, (variant, name, message)
        assert not (planted / "model" / "PLANTED_CODE_RAN").exists(), (variant, name)


def test_base_model_auto_map_is_ignored_only_for_types_transformers_implements(planted, tmp_path, capsys):
    """Phi-3.5-mini's repository ships modeling_phi3.py; transformers loads its own Phi-3 class instead. A local
    base LM whose config asks for code of a type transformers does not know is refused."""
    import phiclip_cli

    config = json.loads((planted / "model" / "config.json").read_text())
    lm = tmp_path / "lm"
    shutil.copytree(config["text_model"], lm)
    (lm / "planted.py").write_text(PLANTED)
    _edit(lm / "config.json", lambda d: d.update(auto_map={"AutoModelForCausalLM": "planted.PlantedModel"}))
    _edit(planted / "model" / "config.json", lambda d: d.update(text_model=str(lm)))
    assert phiclip_cli.main(["chat", str(planted), "Hi"]) == 0  # llama: transformers' own class, auto_map ignored
    capsys.readouterr()
    _edit(lm / "config.json", lambda d: d.update(model_type="planted"))
    assert phiclip_cli.main(["chat", str(planted), "Hi"]) == 2
    err = capsys.readouterr().err
    assert str(lm / "config.json") in err and "planted.PlantedModel" in err
    assert not (lm / "PLANTED_CODE_RAN").exists() and not (planted / "model" / "PLANTED_CODE_RAN").exists()
