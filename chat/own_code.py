"""Run only PhiClip's code and the libraries' own classes when PhiClip's commands load a model.

A folder or Hub repository can ask transformers to import Python files it ships (``auto_map`` in its
configs, or a class name transformers does not have). Hub users who load a PhiClip model through
the auto classes choose that themselves with ``trust_remote_code=True``; ``phiclip chat``, ``serve``,
``eval``, ``export`` and ``push`` never do: they load with PhiClip's own classes and
``trust_remote_code=False``, and :func:`check_own_code` refuses, before anything is loaded, a folder
whose configs ask for any other code, naming the file and the class. It refuses rather than loading
the standard class instead, because a repository that ships its own tokenizer or image processor
probably needs it to give the answers it was trained to give.

One request is safe to ignore, and is: an ``auto_map`` in a base LM's or tower's config whose
``model_type`` transformers implements itself (Phi-3.5-mini-instruct's repository ships
``modeling_phi3.py``; with ``trust_remote_code=False`` transformers loads its own Phi-3 class).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers

OWN_AUTO_MAP = {
    "AutoConfig": "configuration_phiclip.PhiClipConfig",
    "AutoModel": "modeling_phiclip.PhiClipForCausalLM",
    "AutoModelForCausalLM": "modeling_phiclip.PhiClipForCausalLM",
    "AutoModelForImageTextToText": "modeling_phiclip.PhiClipForCausalLM",
    "AutoProcessor": "processing_phiclip.PhiClipProcessor",
}
OWN_CLASSES = {"PhiClipProcessor", "PhiClipConfig", "PhiClipForCausalLM"}
CONFIG_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                "image_processor_config.json")
CLASS_KEYS = ("tokenizer_class", "image_processor_type", "processor_class", "feature_extractor_type")


class ForeignCodeError(ValueError):
    """A model folder asks for Python code that is not PhiClip's or a library's; the message names file and class."""


def _foreign_auto_map(value: Any) -> list[str]:
    """Classes an ``auto_map`` asks for that are not PhiClip's own (``tokenizer_config``'s lists included)."""
    if not isinstance(value, dict):
        return []
    out = []
    for key, target in value.items():
        for name in target if isinstance(target, (list, tuple)) else [target]:
            if name and name != OWN_AUTO_MAP.get(key):
                out.append(f"{key} -> {name}")
    return out


def _library_class(name: str) -> bool:
    return name in OWN_CLASSES or hasattr(transformers, name) or hasattr(transformers, name.removesuffix("Fast"))


def _native(config: dict) -> bool:
    """transformers implements this config's model type itself (it then ignores the config's auto_map)."""
    return config.get("model_type") in transformers.CONFIG_MAPPING


def check_own_code(folder: str | Path, base: bool = False) -> None:
    """Raise :class:`ForeignCodeError` if any config in ``folder`` (or in a local base LM or tower it names)
    asks for code other than PhiClip's three files and transformers' own classes. ``base``: ``folder`` is a
    base LM or tower, whose auto_map transformers ignores for model types it implements."""
    folder = Path(folder)
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
        nested = [config] + [config[k] for k in ("text_config", "vision_config", "image_processor")
                             if isinstance(config.get(k), dict)]
        for part in nested:
            foreign = _foreign_auto_map(part.get("auto_map"))
            ignored = (base or part is not config) and _native(part)  # a base model that transformers implements
            if foreign and not ignored:
                raise ForeignCodeError(f"{path}: auto_map asks to run code this command does not run: "
                                       f"{', '.join(foreign)}. Load it yourself with trust_remote_code=True if you "
                                       f"trust it, or remove the entry.")
            for key in CLASS_KEYS:
                value = part.get(key)
                if isinstance(value, str) and not _library_class(value):
                    raise ForeignCodeError(f"{path}: {key} '{value}' is not a transformers class; loading it would "
                                           f"run code from the repository, which this command does not do")
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("text_model", "vision_model"):
            named = config.get(key)
            if isinstance(named, str) and Path(named).is_dir() and Path(named).resolve() != folder.resolve():
                check_own_code(named, base=True)
