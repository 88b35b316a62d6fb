#!/usr/bin/env bash
# Side environment .venv-llama for the GGUF export and its llama.cpp tests (make test-gguf):
#  * llama-cpp-python (the runtime: llama.cpp, libmtmd, and llama.cpp's own quantizer through its bindings);
#  * what llama.cpp's converters need (torch, transformers, sentencepiece, safetensors, numpy);
#  * the converters themselves (convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/, gguf-py/),
#    unpacked from the SAME llama-cpp-python source package, so files and runtime come from one llama.cpp;
#  * llamacpp-jinja-render: llama.cpp's own Jinja engine (what llama-server renders chat templates with),
#    built from that source with scripts/llamacpp_jinja_render.cpp, for the test tier.
# PyPI carries llama-cpp-python as a source package only: the first build takes ~6-15 minutes on 2 cores;
# pip's wheel cache makes later installs on the same machine fast. Idempotent: a stamp records what was set up.
# The converters go to $PHICLIP_CACHE/llama.cpp-<version> (default ~/.cache/phiclip), never into git.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/pip_quiet.sh
source scripts/pip_quiet.sh

PYTHON=${PYTHON:-python3}
VENV=.venv-llama
LLAMA_CPP_PYTHON=0.3.36
# torch first and pinned: the CPU build this machine serves; an unpinned torch would pull a CUDA build.
LOCK=requirements/llama.lock  # llama-cpp-python and its converters' imports: exact versions and hashes
CACHE=${PHICLIP_CACHE:-$HOME/.cache/phiclip}
SRC="$CACHE/llama.cpp-$LLAMA_CPP_PYTHON"
STAMP="$VENV/.phiclip-llamacpp-setup"
WANT="$(sha256sum "$LOCK" | cut -d' ' -f1) $LOCK src=$SRC jinja-render"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && [ -f "$SRC/convert_hf_to_gguf.py" ] && [ -x "$SRC/llamacpp-jinja-render" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "installing llama-cpp-python==$LLAMA_CPP_PYTHON (built from source on first use: several minutes) ..."
pip_quiet "$VENV/bin/python" install --require-hashes --no-deps -r "$LOCK"

if [ ! -f "$SRC/convert_hf_to_gguf.py" ]; then
  tmp=$(mktemp -d)
  pip_quiet "$VENV/bin/python" download --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp"
  root="llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"
  tar -xzf "$tmp"/llama_cpp_python-"$LLAMA_CPP_PYTHON".tar.gz -C "$tmp" \
    "$root/convert_hf_to_gguf.py" "$root/convert_lora_to_gguf.py" "$root/conversion" "$root/gguf-py" \
    "$root/LICENSE" "$root/common/jinja" "$root/common/json.h" "$root/common/json.cpp" "$root/common/unicode.h" \
    "$root/common/unicode.cpp" "$root/src/unicode.h" "$root/src/unicode.cpp" "$root/src/unicode-data.h" \
    "$root/src/unicode-data.cpp" "$root/vendor/nlohmann" "$root/ggml/include"
  mkdir -p "$(dirname "$SRC")"
  rm -rf "$SRC.partial"
  mv "$tmp/$root" "$SRC.partial"
  mv "$SRC.partial" "$SRC"
  rm -rf "$tmp"
fi
if [ ! -x "$SRC/llamacpp-jinja-render" ]; then
  lib=$("$VENV/bin/python" -c "import llama_cpp, pathlib; print(pathlib.Path(llama_cpp.__file__).parent / 'lib')")
  g++ -std=c++17 -O1 -I"$SRC/common" -I"$SRC/src" -I"$SRC/vendor" -I"$SRC/ggml/include" \
    scripts/llamacpp_jinja_render.cpp "$SRC"/common/jinja/*.cpp "$SRC/common/json.cpp" "$SRC/common/unicode.cpp" \
    "$SRC/src/unicode.cpp" "$SRC/src/unicode-data.cpp" -L"$lib" -lggml-base -Wl,-rpath,"$lib" \
    -o "$SRC/llamacpp-jinja-render"
fi
"$VENV/bin/python" - <<EOF
import llama_cpp, torch, transformers, sentencepiece, safetensors
import llama_cpp.mtmd_cpp
assert llama_cpp.__version__ == "$LLAMA_CPP_PYTHON", llama_cpp.__version__
assert hasattr(llama_cpp, "llama_model_quantize"), "llama_cpp lacks llama_model_quantize"
EOF
echo "$WANT" > "$STAMP"
echo "llama.cpp side environment set up in $VENV (converters in $SRC)"
