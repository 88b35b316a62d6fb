"""What ``phiclip prepare llava-instruct`` fetches: the files, their URLs and, where pinned, size and sha256."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_HUB_URL = "https://huggingface.co"
DEFAULT_COCO_URL = "http://images.cocodataset.org/zips"
HUB_REPO = "liuhaotian/LLaVA-Instruct-150K"
HUB_REVISION = "main"

VARIANTS: dict[str, str] = {
    "150k": "llava_instruct_150k.json",
    "mix665k": "llava_v1_5_mix665k.json",
}
_VARIANT_ALIASES = {"150k": "150k", "instruct150k": "150k", "mix665k": "mix665k", "665k": "mix665k"}

COCO_ARCHIVE = "train2017.zip"

# Known (size in bytes, sha256) of each file, None where not pinned. Only
# values cross-checked against several independent published records are
# pinned; everything else is verified against the size the server announces.
#  * train2017.zip: size and sha256 as published for the official COCO 2017
#    archive (the same digest appears in dataset builders and mirror manifests).
#  * llava_instruct_150k.json: size agreed on by independent records; no
#    sha256 pinned.
#  * llava_v1_5_mix665k.json: nothing pinned.
KNOWN_FILES: dict[str, tuple[int | None, str | None]] = {
    "llava_instruct_150k.json": (228_941_895, None),
    "llava_v1_5_mix665k.json": (None, None),
    COCO_ARCHIVE: (
        19_336_861_798,
        "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
    ),
}


@dataclass(frozen=True)
class RemoteFile:
    """One file to fetch: local file ``name`` from ``url``.

    ``size``/``sha256`` are the expected values when known (None: not
    pinned). ``extract`` marks an archive to unpack after download.
    """

    name: str
    url: str
    size: int | None
    sha256: str | None
    extract: bool


def normalize_variant(variant: str) -> str:
    key = variant.lower().replace("-", "").replace("_", "")
    if key not in _VARIANT_ALIASES:
        raise ValueError(f"unknown LLaVA-Instruct variant {variant!r}; expected one of {sorted(VARIANTS)}")
    return _VARIANT_ALIASES[key]


def _resolve_base(explicit: str | None, env_names: tuple[str, ...], default: str) -> str:
    if explicit:
        return explicit.rstrip("/")
    for name in env_names:
        value = os.environ.get(name)
        if value:
            return value.rstrip("/")
    return default


def hub_file_url(hub_url: str, filename: str, repo: str = HUB_REPO, revision: str = HUB_REVISION) -> str:
    return f"{hub_url.rstrip('/')}/datasets/{repo}/resolve/{revision}/{filename}"


def llava_instruct_sources(
    variant: str = "150k",
    *,
    hub_url: str | None = None,
    coco_url: str | None = None,
    skip_images: bool = False,
) -> list[RemoteFile]:
    """Files needed for ``variant`` ("150k" or "mix665k"), JSON first."""
    variant = normalize_variant(variant)
    hub = _resolve_base(hub_url, ("PHICLIP_HUB_URL", "HF_ENDPOINT"), DEFAULT_HUB_URL)
    coco = _resolve_base(coco_url, ("PHICLIP_COCO_URL",), DEFAULT_COCO_URL)
    json_name = VARIANTS[variant]
    size, sha = KNOWN_FILES.get(json_name, (None, None))
    files = [RemoteFile(json_name, hub_file_url(hub, json_name), size, sha, extract=False)]
    if not skip_images:
        size, sha = KNOWN_FILES.get(COCO_ARCHIVE, (None, None))
        files.append(RemoteFile(COCO_ARCHIVE, f"{coco}/{COCO_ARCHIVE}", size, sha, extract=True))
    return files
