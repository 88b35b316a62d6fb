"""``phiclip eval``: score a run on an eval set, or compare earlier evaluations; ``phiclip lmms-task``: the same
eval set as an lmms-eval task."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from evaluation.metrics import METRICS


def _eval(args: argparse.Namespace) -> int:
    from evaluation.report import compare_table

    if args.compare:
        if args.run_dir or args.data:
            raise ValueError("--compare takes run directories or metrics.json files only, no RUN_DIR DATA")
        print(compare_table(args.compare))
        return 0
    if not args.run_dir or not args.data:
        raise ValueError("give RUN_DIR and DATA (or --compare A B ...)")

    from chat.assistant import VisionChat
    from data.sources import is_dataset_source
    from evaluation.evaluate import evaluate_run
    from evaluation.report import write_report

    run_dir, data = Path(args.run_dir), args.data
    if args.images is not None:
        images = args.images
    else:  # a dataset's own folder (data.sources.images_dir), a JSON file's folder
        images = "" if is_dataset_source(data) else str(Path(data).parent)
    name = (re.sub(r"[^\w.-]+", "--", data.removeprefix("hf://")) if data.startswith("hf://")
            else Path(data).stem)
    if args.out:
        out = Path(args.out)
    elif run_dir.is_dir():
        out = run_dir / "eval" / name
    else:  # a Hub repo id
        out = Path("runs") / "eval" / str(args.run_dir).replace("/", "--") / name
    chat = VisionChat.load(run_dir)
    try:
        result = evaluate_run(
            chat,
            data,
            images,
            metric=args.metric,
            batch_size=args.batch_size,
            limit=args.limit,
            max_new_tokens=args.max_new_tokens,
            prompt_suffix=args.prompt_suffix,
        )
    except ImportError as err:  # caption metrics without pycocoevalcap: a message, not a traceback
        raise ValueError(str(err)) from err
    result.metrics["run"] = str(run_dir)
    page = write_report(result, out, run_dir)
    if result.report.problems:
        print(result.report.summary(show=10))
    shown = {k: v for k, v in result.metrics.items() if k not in ("data", "images", "run", "prompt_suffix")}
    print(json.dumps(shown, indent=1))
    print(f"metrics: {out / 'metrics.json'}\nreport:  {page}")
    return 0


def _lmms_task(args: argparse.Namespace) -> int:
    from evaluation.lmms_tasks import write_task

    path, report = write_task(args.data, args.out, args.name, images=args.images, metric=args.metric,
                              max_new_tokens=args.max_new_tokens, prompt_suffix=args.prompt_suffix, limit=args.limit,
                              image_markers=not args.no_image_markers)
    print(report.summary(show=10))
    print(f"task: {path}\nrun it: lmms-eval --model phiclip --model_args pretrained=RUN --tasks {args.name} "
          f"--include_path {path.parent}")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a run on a LLaVA-format eval set (VQA, exact, caption, yes/no), or --compare evaluations",
        description="Answer every item of DATA with the run and score the answers. Writes metrics.json, "
        "answers.jsonl and a self-contained report.html.",
    )
    p.add_argument("run_dir", nargs="?", help="training run directory, PhiClip folder or Hub repo id")
    p.add_argument("data", nargs="?", help="eval set (gpt turn or 'answers' list as reference): LLaVA "
                   "JSON/JSONL, parquet/arrow file or folder, or hf://OWNER/NAME[:CONFIG][/SPLIT][@REVISION]")
    p.add_argument("--images", default=None, help="images folder (default: the folder of DATA)")
    p.add_argument("--metric", choices=METRICS, default="auto",
                   help="auto: choice if every item has 'choices' (the most likely candidate, by log-probability), "
                   "yesno if all references are yes/no, caption if long, vqa if several answers, else exact")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N usable items (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompt-suffix", default="",
                   help="appended to every question, e.g. 'Answer the question using a single word or phrase.'")
    p.add_argument("--out", help="output folder (default: RUN_DIR/eval/<DATA name>; runs/eval/<repo>/... for a repo id)")
    p.add_argument("--compare", nargs="+", metavar="RUN_OR_METRICS",
                   help="print one table from the metrics.json of these runs / eval folders / files")
    p.set_defaults(func=_eval)

    t = subparsers.add_parser(
        "lmms-task",
        help="write an eval set as an lmms-eval task (YAML + JSON lines) scored like phiclip eval",
        description="Read DATA as phiclip eval does and write OUT/NAME.yaml and OUT/NAME.jsonl, a task for "
        "lmms-eval --include_path OUT (with PhiClip's [lmms] extra: --model phiclip).",
    )
    t.add_argument("data", help="eval set: LLaVA JSON/JSONL, parquet/arrow file or folder, or hf://...")
    t.add_argument("out", help="task folder (lmms-eval's --include_path)")
    t.add_argument("--name", required=True, help="task name (letters, digits, underscores)")
    t.add_argument("--images", default=None, help="images folder (default: the folder of DATA)")
    t.add_argument("--metric", choices=("auto", "exact", "vqa", "yesno", "choice"), default="auto")
    t.add_argument("--max-new-tokens", type=int, default=32)
    t.add_argument("--prompt-suffix", default="", help="appended to every question")
    t.add_argument("--limit", type=int, default=0, help="only the first N usable items (0: all)")
    t.add_argument("--no-image-markers", action="store_true",
                   help="questions without <image> (images first), for lmms-eval models other than phiclip")
    t.set_defaults(func=_lmms_task)
