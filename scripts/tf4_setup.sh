#!/usr/bin/env bash
# Side environment .venv-tf4 with the last transformers 4.x release, to check that the remote code
# (configuration_phiclip.py, modeling_phiclip.py, processing_phiclip.py) still loads and generates
# the same answers there (tests/test_transformers4.py). Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv-tf4
# torch first and pinned: the CPU build this machine serves; an unpinned torch would pull a CUDA build.
TORCH="torch==2.13.0"
# transformers 4.57.x is the last 4.x series; it wants huggingface_hub >=0.34,<1.0 and tokenizers <=0.23.
# peft: the project's own version (it still supports transformers 4.x) so adapters load the same way.
PACKAGES=("transformers==4.57.6" "huggingface_hub==0.36.2" "tokenizers>=0.22,<=0.23.0" "peft==0.21.2"
          "safetensors" "pillow" "sentencepiece" "accelerate")
STAMP="$VENV/.phiclip-tf4-setup"
WANT="$TORCH ${PACKAGES[*]}"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() {  # quiet; drops pip's notes about this machine's missing local index folders
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q "$@" 2>"$log"; then cat "$log" >&2; rm -f "$log"; return 1; fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
  rm -f "$log"
}
pip_install "$TORCH"
pip_install "$TORCH" "${PACKAGES[@]}"
"$VENV/bin/python" -c "import torch, transformers, peft
assert transformers.__version__.startswith('4.57.'), transformers.__version__"
echo "$WANT" > "$STAMP"
echo "transformers 4.57 side environment set up in $VENV"
