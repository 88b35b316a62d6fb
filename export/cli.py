"""``phiclip export``: a PhiClip model as a standard Hugging Face Llava checkpoint, or as GGUF files for llama.cpp."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _export_gguf(args: argparse.Namespace) -> int:
    from export.gguf import INFO_FILE, export_gguf

    out = export_gguf(args.run_dir, args.out, quants=args.quant, name=args.name, repo_id=args.repo_id,
                      text_route=not args.no_text_route, overwrite=args.overwrite,
                      allow_approximate_vision=args.allow_approximate_vision)
    info = json.loads((Path(out) / INFO_FILE).read_text())
    print(f"exported {args.run_dir} -> {out}")
    for file, size in info["files"].items():
        print(f"  {file}  {size / 2**20:.1f} MB")
    cosine = info["vision_cosine_min"]
    print(f"image features: {info['vision']}; llama.cpp vs PhiClip per-token cosine (min) "
          f"{cosine['square']:.5f} square, {cosine['wide_3x2']:.5f} 3:2")
    if not info["vision_exact"]:
        print("warning: llama.cpp's image features are approximate (--allow-approximate-vision); the figures above "
              "are in the card and phiclip_gguf.json")
    lm = next(f for f in info["files"] if f.endswith(f"-{info['default_quant'].upper()}.gguf")
              or f.endswith(f"-{info['default_quant']}.gguf"))
    mmproj = next(f for f in info["files"] if f.startswith("mmproj-"))
    print(f"run it: llama-mtmd-cli -m {Path(out) / lm} --mmproj {Path(out) / mmproj} --image IMG -p QUESTION "
          "--temp 0 --repeat-penalty 1")
    print(f"        ollama create {info['name']} -f {Path(out) / 'Modelfile'}")
    return 0


def _export_vllm_lora(args: argparse.Namespace) -> int:
    from export.vllm_lora import INFO_FILE, export_vllm_lora, serve_command

    out = Path(export_vllm_lora(args.run_dir, args.out, dtype=args.dtype, name=args.name, overwrite=args.overwrite))
    info = json.loads((out / INFO_FILE).read_text())
    names = info["served_names"]
    print(f"exported {args.run_dir} -> {out}  (base LM unmerged, LoRA adapter rank {info['lora_rank']} in "
          f"{out / info['lora_dir']})")
    print(f"routes: image questions -> model \"{names['image']}\", text-only questions -> model \"{names['text']}\"")
    stem = info["name"]
    print(f"serve it: {serve_command(out.resolve(), stem, info['max_lora_rank'])}")
    print(f"  or, with this repository's vLLM CPU build: scripts/vllm_serve.sh {out}  (adds the LoRA arguments itself)")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.format == "gguf":
        return _export_gguf(args)
    if args.quant or args.repo_id or args.no_text_route or args.allow_approximate_vision:
        raise SystemExit("--quant, --repo-id, --no-text-route and --allow-approximate-vision apply to --format gguf "
                         "only")
    if args.format == "vllm-lora":
        return _export_vllm_lora(args)
    if args.name:
        raise SystemExit("--name applies to --format gguf and vllm-lora only")
    from export.checkpoint import export_run

    out = export_run(args.run_dir, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported {args.run_dir} -> {out}")
    print("load it with: LlavaForConditionalGeneration.from_pretrained(OUT), AutoProcessor.from_pretrained(OUT)")
    print(f"serve it with vLLM: scripts/vllm_serve.sh {Path(out)}")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="merge the LoRA adapter and write a standard HF Llava checkpoint (transformers, vLLM, lmms-eval) "
        "or GGUF files (llama.cpp, Ollama, LM Studio)",
        description="Merge the LoRA adapter into the LM (a QLoRA run's base is loaded in full precision) "
        "and write config, safetensors, LlavaProcessor and chat template to OUT (--format llava), or the LM "
        "and mmproj GGUF files, Modelfile and card (--format gguf); or the Llava checkpoint with the base LM "
        "unmerged and the LoRA adapter in OUT/lora for vLLM's per-request LoRA (--format vllm-lora).",
    )
    p.add_argument("run_dir", help="training run directory, PhiClip folder or Hub repo id")
    p.add_argument("out", help="folder to write (must not exist or be empty, unless --overwrite)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="weights dtype; auto: the LM checkpoint's own")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--format", choices=("llava", "gguf", "vllm-lora"), default="llava",
                   help="llava: HF Llava checkpoint, adapter merged (default); gguf: LM + mmproj GGUF files for "
                   "llama.cpp, Ollama, LM Studio (needs the llama.cpp side environment: bash "
                   "scripts/llamacpp_setup.sh); vllm-lora: Llava checkpoint with the base LM unmerged + the LoRA "
                   "adapter in lora/, for vLLM with --enable-lora (image questions use the adapter, text-only "
                   "questions the base LM, as in PhiClip)")
    p.add_argument("--quant", nargs="+", default=[], metavar="TYPE",
                   help="gguf: quantized LM files besides f16 (q8_0, q4_k_m, q4_0, q5_k_m, q6_k)")
    p.add_argument("--name", help="gguf: file name stem; vllm-lora: stem of the served model names NAME-image and "
                   "NAME-text (default: the run's folder name)")
    p.add_argument("--repo-id", help="gguf: Hub repository the card's commands name (default OWNER/<name>-GGUF)")
    p.add_argument("--no-text-route", action="store_true",
                   help="gguf: skip the base LM + LoRA adapter files of the text-only route")
    p.add_argument("--allow-approximate-vision", action="store_true",
                   help="gguf: export a CLIP tower with vision_feature_select_strategy 'default' without its class "
                   "token (the pinned llama.cpp cannot keep it in attention and then drop it); refused without this "
                   "flag. The export measures and reports the per-token cosine. SigLIP + 'full' is exact")
    p.set_defaults(func=_export)
