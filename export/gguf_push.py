"""``phiclip push SOURCE REPO_ID --gguf``: the GGUF export to its own Hub repository, in one commit.

``SOURCE`` is a GGUF export folder (it holds ``phiclip_gguf.json``) or anything ``phiclip export``
takes, which is then exported first. The card's commands name ``REPO_ID``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from export.gguf import INFO_FILE, export_gguf


def push_gguf(source: str | Path, repo_id: str, *, quants: list[str] | tuple[str, ...] = ("q8_0",),
              private: bool | None = None, token: str | None = None):
    """Upload the GGUF files, Modelfiles, card and ``phiclip_gguf.json`` to ``repo_id``; returns the commit info."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="phiclip-gguf-push-") as scratch:
        folder = Path(source)
        if not (folder / INFO_FILE).is_file():
            folder = export_gguf(source, Path(scratch) / "gguf", quants=quants, repo_id=repo_id)
        info = json.loads((folder / INFO_FILE).read_text())
        card = (folder / "README.md").read_text(encoding="utf-8")
        if info.get("repo_id") and info["repo_id"] != repo_id:
            card = card.replace(info["repo_id"], repo_id)
        info["repo_id"] = repo_id
        operations = [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")),
                      CommitOperationAdd(path_in_repo=INFO_FILE,
                                         path_or_fileobj=json.dumps(info, indent=1).encode("utf-8"))]
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if name not in ("README.md", INFO_FILE):
                operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations, commit_message=f"GGUF export of {info['name']} (PhiClip)")
