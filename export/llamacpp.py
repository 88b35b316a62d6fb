"""The llama.cpp side environment the GGUF export runs: llama-cpp-python and the converters of the same version.

``scripts/llamacpp_setup.sh`` makes ``.venv-llama`` (llama-cpp-python, torch, transformers,
sentencepiece) and unpacks ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py``, ``conversion/``
and ``gguf-py/`` from the same llama-cpp-python source package into
``$PHICLIP_CACHE/llama.cpp-<version>``. ``PHICLIP_LLAMA_PYTHON`` and ``PHICLIP_LLAMA_CPP_SRC``
point elsewhere. Everything llama.cpp does for the export runs in subprocesses of that Python.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SETUP = "bash scripts/llamacpp_setup.sh"
_ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("llamacpp_runner.py")


class LlamaCppError(RuntimeError):
    """llama.cpp's environment is missing, or one of its tools failed; the message says which and how."""


@dataclass(frozen=True)
class LlamaCpp:
    """``python``: the side environment's interpreter; ``src``: the unpacked converters (and the Jinja renderer);
    ``version``: llama-cpp-python's."""

    python: Path
    src: Path
    version: str

    def run(self, args: list[str], what: str, timeout: float | None = None) -> str:
        """Run ``python ARGS`` in the side environment; returns stdout, raises :class:`LlamaCppError` on failure."""
        env = dict(os.environ, PYTHONNOUSERSITE="1")
        env.pop("PYTHONPATH", None)
        done = subprocess.run([str(self.python), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-25:])
            raise LlamaCppError(f"{what} failed (exit {done.returncode}):\n{tail}")
        return done.stdout

    def runner(self, command: str, args: dict, timeout: float | None = None) -> dict:
        """One :mod:`export.llamacpp_runner` command; returns its JSON result."""
        out = self.run([str(RUNNER), command, json.dumps(args)], f"llama.cpp {command}", timeout)
        return json.loads(out.strip().splitlines()[-1])

    def script(self, name: str) -> str:
        return str(self.src / name)


def cache_root() -> Path:
    return Path(os.environ.get("PHICLIP_CACHE", Path.home() / ".cache" / "phiclip"))


def find_llamacpp() -> LlamaCpp:
    """The side environment, checked to exist and to hold the pinned version; raises :class:`LlamaCppError`."""
    python = Path(os.environ.get("PHICLIP_LLAMA_PYTHON", _ROOT / ".venv-llama" / "bin" / "python"))
    src = Path(os.environ.get("PHICLIP_LLAMA_CPP_SRC", cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"))
    if not python.is_file():
        raise LlamaCppError(f"llama.cpp side environment not found ({python}); set it up with: {SETUP}")
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"llama.cpp converters not found in {src}; set them up with: {SETUP}")
    probe = LlamaCpp(python, src, LLAMA_CPP_PYTHON_VERSION)
    version = probe.run(["-c", "import llama_cpp; print(llama_cpp.__version__)"], "importing llama_cpp").strip()
    if version != LLAMA_CPP_PYTHON_VERSION:
        raise LlamaCppError(
            f"{python} has llama-cpp-python {version}; the export and its converters are pinned to "
            f"{LLAMA_CPP_PYTHON_VERSION} ({SETUP})"
        )
    return probe
