"""``phiclip export``: a PhiClip model as a standard Hugging Face Llava checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    from export.checkpoint import export_run

    out = export_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.run_dir} -> {out}")
    print("load it with: LlavaForConditionalGeneration.from_pretrained(OUT), AutoProcessor.from_pretrained(OUT)")
    print(f"serve it with vLLM: scripts/vllm_serve.sh {Path(out)}")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge the LoRA adapter and write a standard HF Llava checkpoint (transformers, vLLM, lmms-eval)",
        description="Merge the LoRA adapter into the LM (a QLoRA run's base is loaded in full precision) "
        "and write config, safetensors, LlavaProcessor and chat template to OUT.",
    )
    p.add_argument("run_dir", help="training run directory, PhiClip folder or Hub repo id")
    p.add_argument("out", help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype; auto: the LM checkpoint's own")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=_export)
