"""The local Hub (tests/hub_server.py) against unmodified huggingface_hub and transformers clients.

Client code runs in a subprocess (huggingface_hub reads HF_ENDPOINT at import time) and prints one
JSON line with what it saw; the assertions compare that with the server's own store.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import LocalHub, git_blob_oid, hub_env

BINARY = bytes(range(256)) * 4 + b"\x00\xff"

HUB_CLIENT = """
import json, sys
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

src, repo_id = Path(sys.argv[1]), "local-user/files"
api = HfApi()
out = {"whoami": api.whoami()["name"], "url": api.create_repo(repo_id)}
out["url_again"] = api.create_repo(repo_id, exist_ok=True)
out["first"] = api.upload_folder(folder_path=src, repo_id=repo_id, commit_message="first").oid
(src / "weights.txt").write_text("v2")
out["second"] = api.upload_folder(folder_path=src, repo_id=repo_id, commit_message="second").oid
out["main"] = Path(hf_hub_download(repo_id, "weights.txt")).read_text()
out["pinned"] = Path(hf_hub_download(repo_id, "weights.txt", revision=out["first"])).read_text()
out["nested"] = Path(hf_hub_download(repo_id, "sub/deep/blob.bin", revision=out["first"])).read_bytes().hex()
snap = Path(snapshot_download(repo_id, revision=out["first"]))
out["snapshot"] = {p.relative_to(snap).as_posix(): p.read_bytes().hex() for p in snap.rglob("*") if p.is_file()}
out["snapshot_dir"] = snap.name
out["files"] = api.list_repo_files(repo_id)
out["info_sha"] = api.model_info(repo_id).sha
out["info_first"] = api.model_info(repo_id, revision=out["first"]).sha
for name, call, error in [
    ("missing_file", lambda: hf_hub_download(repo_id, "nope.txt"), EntryNotFoundError),
    ("missing_repo", lambda: hf_hub_download("local-user/nope", "weights.txt"), RepositoryNotFoundError),
]:
    try:
        call()
        out[name] = "no error"
    except error as e:
        out[name] = type(e).__name__
print(json.dumps(out))
"""

CONFIGURATION_TOY = '''
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "toy"

    def __init__(self, hidden_size: int = 4, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

MODELING_TOY = '''
import torch
from transformers import GenerationMixin, PreTrainedModel

try:
    from .configuration_toy import ToyConfig
except ImportError:
    from configuration_toy import ToyConfig


class ToyModel(PreTrainedModel, GenerationMixin):  # GenerationMixin: transformers probes custom_generate/
    config_class = ToyConfig
    base_model_prefix = "toy"

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)
'''

MODEL_CLIENT = """
import json, sys
import torch
from pathlib import Path
from huggingface_hub import HfApi
from transformers import AutoModel

folder, repo_id = Path(sys.argv[1]), "local-user/toy"
sys.path.insert(0, str(folder))
from configuration_toy import ToyConfig
from modeling_toy import ToyModel

api, x, out = HfApi(), torch.arange(8, dtype=torch.float32).reshape(2, 4), {}

def save(seed: int) -> list:
    torch.manual_seed(seed)
    config = ToyConfig(auto_map={"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel"})
    ToyModel(config).save_pretrained(folder)
    local = AutoModel.from_pretrained(folder, trust_remote_code=True)
    return local(x).tolist()

api.create_repo(repo_id, exist_ok=True)
out["local_v1"] = save(0)
out["sha_v1"] = api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns="__pycache__/*").oid
out["local_v2"] = save(1)
out["sha_v2"] = api.upload_folder(folder_path=folder, repo_id=repo_id, ignore_patterns="__pycache__/*").oid
main = AutoModel.from_pretrained(repo_id, trust_remote_code=True)
pinned = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=out["sha_v1"])
out["class"] = type(main).__module__ + "." + type(main).__name__
out["hub_main"], out["hub_pinned"] = main(x).tolist(), pinned(x).tolist()
print(json.dumps(out))
"""


def run_client(hub: LocalHub, tmp_path: Path, code: str, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter pointed at ``hub``; return the JSON of its last stdout line."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(code))
    env = hub_env(hub.url, tmp_path / "hf-home")
    proc = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)
    if proc.returncode != 0:
        pytest.fail(f"client failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                    f"unknown requests: {hub.unknown_requests()}\nrequests:\n" + "\n".join(hub.requests()[-40:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture()
def hub() -> Iterator[LocalHub]:
    with LocalHub(page_size=3) as server:  # a small page size makes listings follow `Link` pages
        yield server


def test_hub_api_roundtrip(hub: LocalHub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "weights.txt").write_text("v1")
    (src / "config.json").write_text('{"model_type": "toy"}')
    (src / "sub" / "notes.md").write_text("notes")
    (src / "sub" / "deep" / "blob.bin").write_bytes(BINARY)

    out = run_client(hub, tmp_path, HUB_CLIENT, str(src))

    repo = "local-user/files"
    initial, first, second = hub.commits(repo)
    assert (out["first"], out["second"]) == (first, second)
    assert out["whoami"] == "local-user"
    assert out["url"] == out["url_again"] == f"{hub.url}/{repo}"
    uploaded = {"config.json", "weights.txt", "sub/notes.md", "sub/deep/blob.bin"}
    assert set(hub.files(repo, initial)) == {".gitattributes"}
    assert set(hub.files(repo, first)) == uploaded | {".gitattributes"}  # one commit for the whole folder
    assert hub.files(repo, first)["sub/deep/blob.bin"] == BINARY
    assert (hub.files(repo)["weights.txt"], hub.files(repo, first)["weights.txt"]) == (b"v2", b"v1")
    assert (out["main"], out["pinned"]) == ("v2", "v1")
    assert bytes.fromhex(out["nested"]) == BINARY
    assert out["snapshot_dir"] == first
    assert {p: bytes.fromhex(h) for p, h in out["snapshot"].items()} == hub.files(repo, first)
    assert sorted(out["files"]) == sorted(hub.files(repo))
    assert (out["info_sha"], out["info_first"]) == (second, first)
    assert out["missing_file"] == "RemoteEntryNotFoundError"  # the EntryNotFoundError raised for Hub files
    assert out["missing_repo"] == "RepositoryNotFoundError"
    assert hub.unknown_requests() == []


def test_transformers_remote_code(hub: LocalHub, tmp_path: Path) -> None:
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "configuration_toy.py").write_text(CONFIGURATION_TOY)
    (folder / "modeling_toy.py").write_text(MODELING_TOY)

    out = run_client(hub, tmp_path, MODEL_CLIENT, str(folder))

    assert hub.commits("local-user/toy")[1:] == [out["sha_v1"], out["sha_v2"]]
    files = hub.files("local-user/toy", out["sha_v1"])
    assert {"config.json", "model.safetensors", "configuration_toy.py", "modeling_toy.py"} <= set(files)
    assert json.loads(files["config.json"])["auto_map"]["AutoModel"] == "modeling_toy.ToyModel"
    assert out["class"].startswith("transformers_modules.") and out["class"].endswith(".ToyModel")
    assert out["local_v1"] != out["local_v2"]
    assert out["hub_main"] == out["local_v2"]
    assert out["hub_pinned"] == out["local_v1"]
    probes = [line for line in hub.requests() if "/local-user/toy/resolve/" in line and "custom_generate/" in line]
    assert probes and all(line.endswith("-> 404") for line in probes)
    assert hub.unknown_requests() == []


def test_errors_and_unknown_routes(hub: LocalHub) -> None:
    hub.create_repo("local-user/plain")
    sha = hub.commits("local-user/plain")[0]

    def status(path: str, method: str = "GET") -> tuple[int, dict[str, str]]:
        try:
            with urllib.request.urlopen(urllib.request.Request(hub.url + path, method=method)) as r:
                return r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers)

    code, headers = status(f"/local-user/plain/resolve/{sha}/.gitattributes", "HEAD")
    assert (code, headers["X-Repo-Commit"]) == (200, sha)
    assert headers["ETag"] == f'"{git_blob_oid(hub.files("local-user/plain")[".gitattributes"])}"'
    code, headers = status("/local-user/plain/resolve/main/custom_generate/generate.py", "HEAD")
    assert (code, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
    assert status("/local-user/plain/resolve/v9/x")[1]["X-Error-Code"] == "RevisionNotFound"
    assert status("/local-user/none/resolve/main/x")[1]["X-Error-Code"] == "RepoNotFound"
    assert status("/api/whoami-v2")[0] == 401  # no token
    assert status("/api/spaces/local-user/plain")[0] == 404
    assert hub.unknown_requests() == ["GET /api/spaces/local-user/plain -> 404"]


def test_main_serves_in_a_subprocess(tmp_path: Path) -> None:
    server = Path(__file__).with_name("hub_server.py")
    proc = subprocess.Popen([sys.executable, str(server), "--repo", "someone/thing"], stdout=subprocess.PIPE,
                            text=True)
    try:
        url = proc.stdout.readline().strip()
        request = urllib.request.Request(f"{url}/api/models/someone/thing",
                                         headers={"Authorization": "Bearer x"})
        with urllib.request.urlopen(request, timeout=10) as r:
            info = json.load(r)
        assert info["id"] == "someone/thing" and len(info["sha"]) == 40
    finally:
        proc.terminate()
        proc.wait(timeout=10)
