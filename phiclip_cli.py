"""``phiclip`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.hub import quiet_offline_kernel_fetch

quiet_offline_kernel_fetch()  # before the imports below bring in peft, which imports bitsandbytes

from evaluation.cli import add_subparser as add_eval  # noqa: E402
from export.cli import add_subparser as add_export  # noqa: E402
from prepare.cli import add_subparser as add_prepare  # noqa: E402
from serve.cli import add_subparser as add_serve  # noqa: E402


def _train(args: argparse.Namespace) -> int:
    from runtime.config import load_config
    from train.run import train

    cfg = load_config(args.config, args.overrides)
    run = train(cfg, resume=args.resume)
    print(f"run directory: {run}")
    return 0


def _chat(args: argparse.Namespace) -> int:
    from chat.assistant import GenerationSettings, VisionChat
    from processing_phiclip import open_image

    images = [open_image(path) for path in args.image]  # fails fast, naming the file, before the model loads
    chat = VisionChat.load(args.run_dir)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    messages = [{"role": "user", "content": args.question}]
    if args.stream:
        for piece in chat.stream(messages, images, settings):
            print(piece, end="", flush=True)
        print()
    else:
        print(chat.answer(messages, images, settings))
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from data.check import check_dataset

    if args.system_prompt is not None and not args.tokenizer:
        raise ValueError("--system-prompt is checked against a chat template: give --tokenizer too")
    report = check_dataset(args.data, args.images, tokenizer=args.tokenizer, system_prompt=args.system_prompt)
    print(report.summary(show=args.show))
    return 0 if report.n_kept else 1


def _data_stats(args: argparse.Namespace) -> int:
    from data.stats import dataset_stats

    print(dataset_stats(args.data, tokenizer=args.tokenizer, max_length=args.max_length))
    return 0


def _data_to_parquet(args: argparse.Namespace) -> int:
    from prepare.parquet import write_parquet

    report = write_parquet(args.data, args.images, args.out)
    print(report.summary(show=args.show))
    print(f"parquet dataset: {Path(args.out) / 'data'} (train with data.train={args.out})")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from demo.run import run_demo

    run_demo(Path(args.out), fresh=args.fresh)
    return 0


def _push(args: argparse.Namespace) -> int:
    if args.gguf and (args.results or args.no_run_results):
        raise SystemExit("--results and --no-run-results apply to the model's own card, not --gguf")
    if args.gguf:
        from export.gguf_push import push_gguf

        commit = push_gguf(args.source, args.repo_id, quants=args.quant or ["q8_0"], private=args.private or None)
        print(f"pushed the GGUF export of {args.source} -> {commit.commit_url}")
        print(f"run it: llama-server -hf {args.repo_id}")
        return 0
    if args.quant:
        raise SystemExit("--quant applies to --gguf only")
    from publish.push import example_questions, push, run_result_files

    examples = None
    if args.examples:
        examples = example_questions(args.examples, args.images, args.n_examples)
    results = ([] if args.no_run_results else run_result_files(args.source)) + args.results
    commit = push(args.source, args.repo_id, examples, datasets=args.dataset, license=args.license,
                  private=args.private or None, results=results)
    print(f"pushed {args.source} -> {commit.commit_url}")
    print("evaluation results on the card: " + (", ".join(map(str, results)) or "none"))
    print(f"load it pinned to this commit: AutoModelForCausalLM.from_pretrained({args.repo_id!r}, "
          f"trust_remote_code=True, revision={commit.oid!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phiclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline demo: synthetic shapes data, train, evaluate, answer")
    p.add_argument("--out", default="runs/demo", help="run directory to write")
    p.add_argument("--fresh", action="store_true", help="retrain even if the run directory is complete")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=2")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("push", help="upload a model (projector + LoRA adapter + code + card) to the Hub, one commit")
    p.add_argument("source", help="training run directory or PhiClip folder")
    p.add_argument("repo_id", help="Hub repository, e.g. you/phiclip-phi3.5-clip")
    p.add_argument("--examples", help="LLaVA JSON whose first image questions the card shows, answered by the model "
                   "(default: the run's eval data, else its training data)")
    p.add_argument("--images", default="", help="images folder for --examples")
    p.add_argument("--n-examples", type=int, default=3)
    p.add_argument("--dataset", action="append", default=[], help="dataset id for the card (repeatable)")
    p.add_argument("--license", default="mit")
    p.add_argument("--results", action="append", default=[], metavar="FILE",
                   help="evaluation results for the card's metadata (model-index) and results table: an lmms-eval "
                   "*_results.json or a phiclip eval metrics.json (repeatable); added to the run's own phiclip eval "
                   "results (its eval.json or metrics.json, and eval/*/metrics.json)")
    p.add_argument("--no-run-results", action="store_true",
                   help="leave the run's own phiclip eval results off the card")
    p.add_argument("--private", action="store_true")
    p.add_argument("--gguf", action="store_true", help="upload the GGUF export (LM + mmproj for llama.cpp, Ollama, "
                   "LM Studio) instead; SOURCE may also be a folder written by `phiclip export --format gguf`")
    p.add_argument("--quant", nargs="+", default=[], metavar="TYPE",
                   help="with --gguf: quantized LM files besides f16 (default q8_0)")
    p.set_defaults(func=_push)

    p = sub.add_parser("chat", help="ask a model a question, with or without an image")
    p.add_argument("run_dir", help="training run directory, PhiClip folder or Hub repo id")
    p.add_argument("question")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several images, in order); "
                   "without any the base LM answers (adapter disabled)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=_chat)

    data = sub.add_parser("data", help="inspect a dataset (LLaVA JSON/JSONL, parquet/arrow, hf://OWNER/NAME...)")
    data = data.add_subparsers(dest="data_command", required=True)
    p = data.add_parser("check", help="validate every record and image; print a report of what would be skipped")
    p.add_argument("data", help="LLaVA JSON/JSONL, parquet/arrow file or folder, or "
                   "hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]")
    p.add_argument("--images", default="", help="images folder the records' paths are relative to "
                   "(default for a local dataset: its folder)")
    p.add_argument("--show", type=int, default=50, help="how many problems to list")
    p.add_argument("--tokenizer", default=None, help="check this LM's chat template first, as phiclip train does, "
                   "and count records whose text spells one of its special tokens (Hub name, path, offline:NAME)")
    p.add_argument("--system-prompt", default=None, help="the run's data.system_prompt, checked against the "
                   "tokenizer's chat template (Gemma's refuses a system role)")
    p.set_defaults(func=_data_check)
    p = data.add_parser("stats", help="records, turns, images and token lengths")
    p.add_argument("data")
    p.add_argument("--tokenizer", default="offline:smollm2-135m-instruct", help="tokenizer (Hub name, path, offline:NAME)")
    p.add_argument("--max-length", type=int, default=2048)
    p.set_defaults(func=_data_stats)
    p = data.add_parser("to-parquet", help="write LLaVA JSON + image files as a parquet dataset with the images inside")
    p.add_argument("data", help="LLaVA JSON/JSONL")
    p.add_argument("out", help="output folder (parquet files go to OUT/data/)")
    p.add_argument("--images", required=True, help="images folder the records' paths are relative to")
    p.add_argument("--show", type=int, default=20, help="how many left-out records to list")
    p.set_defaults(func=_data_to_parquet)

    for add in (add_prepare, add_eval, add_export, add_serve):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"phiclip {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
