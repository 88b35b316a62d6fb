#!/usr/bin/env bash
# Side environment .venv-newest with the newest transformers and peft releases on the package index, for
# tests/test_hub_versions.py: the Hub files run inside whatever transformers a user installs today.
# Resolved again on every run (`make test` calls this script); reinstalled only when the index has a newer
# release than the stamp records. Everything else here is unpinned too: the newest release a user would get.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pip_quiet.sh
source scripts/pip_quiet.sh

PYTHON=${PYTHON:-python3}
VENV=.venv-newest
TORCH="torch==2.13.0"  # the CPU build this machine serves; an unpinned torch would pull a CUDA build
STAMP="$VENV/.phiclip-newest-setup"

newest() {  # the newest release of $1 on the index, e.g. 5.25.0
  local line
  line=$("$PYTHON" -m pip index versions "$1" 2>/dev/null | head -n 1) || true
  [[ "$line" =~ ^$1\ \(([^\)]+)\)$ ]] || { echo "newest_setup.sh: cannot resolve the newest $1 on the index" >&2; exit 1; }
  echo "${BASH_REMATCH[1]}"
}
WANT="$TORCH transformers==$(newest transformers) peft==$(newest peft)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  echo "newest lane: $WANT (cached)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" install --upgrade "$TORCH"
# shellcheck disable=SC2086
pip_quiet "$VENV/bin/python" install --upgrade $WANT huggingface_hub accelerate safetensors pillow sentencepiece bitsandbytes
echo "$WANT" > "$STAMP"
echo "newest lane: $WANT (installed)"
