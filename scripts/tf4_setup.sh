#!/usr/bin/env bash
# Side environment .venv-tf4 with the last transformers 4.x release, to check that the remote code
# (configuration_phiclip.py, modeling_phiclip.py, processing_phiclip.py) still loads and generates
# the same answers there (the oldest lane of tests/test_hub_versions.py). Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pip_quiet.sh
source scripts/pip_quiet.sh

PYTHON=${PYTHON:-python3}
VENV=.venv-tf4
LOCK=requirements/tf4.lock  # transformers 4.57.6 and what it needs, exact versions and hashes (scripts/lock.sh)
STAMP="$VENV/.phiclip-tf4-setup"
WANT="$(sha256sum "$LOCK" | cut -d' ' -f1) $LOCK"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_quiet "$VENV/bin/python" install --require-hashes --no-deps -r "$LOCK"
"$VENV/bin/python" -m pip check
"$VENV/bin/python" -c "import torch, transformers, peft
assert transformers.__version__.startswith('4.57.'), transformers.__version__"
echo "$WANT" > "$STAMP"
echo "transformers 4.57 side environment set up in $VENV"
