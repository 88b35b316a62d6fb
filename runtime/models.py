"""Model names every command takes: a Hub id, a local folder, or ``offline:NAME`` for the models that need no Hub.

``offline:smollm2-135m-instruct`` is SmolLM2-135M-Instruct from PyPI (:mod:`offline.smollm2`);
``offline:shapes-tower`` is the small SigLIP-architecture tower trained on the synthetic shapes
(:mod:`offline.tower_training`). Both are built once and cached (``PHICLIP_CACHE``).
"""

from __future__ import annotations

from offline.cache import cache_dir
from offline.smollm2 import convert_smollm2

PREFIX = "offline:"
SMOLLM2 = "smollm2-135m-instruct"
SHAPES_TOWER = "shapes-tower"
HUB_NAMES = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # where the offline copies come from


def resolve(name: str) -> str:
    """Map ``offline:NAME`` to a local checkpoint folder, building it if needed; pass others through."""
    if not name.startswith(PREFIX):
        return name
    key = name[len(PREFIX):]
    target = cache_dir() / key
    if key == SMOLLM2:
        if not (target / "config.json").is_file():
            convert_smollm2(target)
        return str(target)
    if key == SHAPES_TOWER:
        from offline.tower_training import pretrain_shapes_tower  # torch and transformers: only when asked for

        pretrain_shapes_tower(target)  # returns at once when a tower with the same settings is there
        return str(target)
    raise ValueError(f"unknown offline model '{name}' (known: {PREFIX}{SMOLLM2}, {PREFIX}{SHAPES_TOWER})")
