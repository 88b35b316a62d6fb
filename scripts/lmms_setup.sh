#!/usr/bin/env bash
# Side environment .venv-lmms: lmms-eval 0.7.3 beside PhiClip (editable, so its `lmms_eval.models` entry point
# registers the `phiclip` model), for tests/test_lmms_eval.py. Idempotent: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pip_quiet.sh
source scripts/pip_quiet.sh

PYTHON=${PYTHON:-python3}
VENV=.venv-lmms
LOCKS=(requirements/lmms.lock requirements/lmms-eval.lock)  # exact versions and hashes (scripts/lock.sh)
STAMP="$VENV/.phiclip-lmms-setup"
WANT="$(cat "${LOCKS[@]}" setup.py | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
for lock in "${LOCKS[@]}"; do
  pip_quiet "$VENV/bin/python" install --require-hashes --no-deps -r "$lock"
done
pip_quiet "$VENV/bin/python" install --no-deps -e .
"$VENV/bin/python" -c "from lmms_eval.models import get_model
assert get_model('phiclip').__name__ == 'PhiClipLmms', 'the phiclip entry point did not register'"
echo "$WANT" > "$STAMP"
echo "lmms-eval side environment set up in $VENV"
