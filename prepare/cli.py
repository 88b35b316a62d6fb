"""``phiclip prepare``: the command line over :func:`prepare.llava_instruct.prepare_llava_instruct`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prepare.common import PrepareError
from prepare.llava_instruct import prepare_llava_instruct
from prepare.sources import COCO_ARCHIVE, DEFAULT_COCO_URL, DEFAULT_HUB_URL

PARQUET_SUBDIR = "parquet"  # --parquet writes OUT/parquet/data/*.parquet


def _run(args: argparse.Namespace) -> int:
    try:
        summary = prepare_llava_instruct(
            Path(args.out),
            variant="mix665k" if args.mix665k else "150k",
            hub_url=args.hub_url,
            coco_url=args.coco_url,
            skip_images=args.skip_images,
        )
        if args.parquet:
            from prepare.parquet import write_parquet

            report = write_parquet(summary.json_path, summary.images_dir, Path(args.out) / PARQUET_SUBDIR)
            print(report.summary(show=10), flush=True)
            print(f"parquet dataset: {Path(args.out) / PARQUET_SUBDIR} (train with "
                  f"data.train={Path(args.out) / PARQUET_SUBDIR})", flush=True)
    except (PrepareError, FileExistsError, ValueError) as e:
        print(f"phiclip prepare: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"phiclip prepare: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("phiclip prepare: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def add_subparser(subparsers) -> None:
    """Register ``prepare llava-instruct`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "prepare",
        help="download training data (LLaVA-Instruct JSON + COCO train2017 images)",
        description=(
            "Download the LLaVA-Instruct-150K conversations (or the 665K mix) from the "
            "Hugging Face Hub and the COCO train2017 images, resumably, verify them and "
            "check that every referenced image is present. Rerun to resume or re-check."
        ),
    )
    p.add_argument("dataset", choices=["llava-instruct"], help="what to prepare")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument(
        "--mix665k", action="store_true",
        help="use llava_v1_5_mix665k.json instead of llava_instruct_150k.json "
        "(non-COCO images of the mix are not downloaded)",
    )
    p.add_argument(
        "--skip-images", action="store_true",
        help="do not download/extract COCO train2017 (still checks images already present)",
    )
    p.add_argument(
        "--parquet", action="store_true",
        help=f"also write the conversations with their images inside as a parquet dataset, OUT/{PARQUET_SUBDIR} "
        "(one folder to move to a cluster; phiclip data check and data.train read it)",
    )
    p.add_argument(
        "--hub-url", default=None, metavar="URL",
        help=f"Hugging Face Hub endpoint or mirror (default: $PHICLIP_HUB_URL, $HF_ENDPOINT or {DEFAULT_HUB_URL})",
    )
    p.add_argument(
        "--coco-url", default=None, metavar="URL",
        help=f"base URL holding {COCO_ARCHIVE} (default: $PHICLIP_COCO_URL or {DEFAULT_COCO_URL})",
    )
    p.set_defaults(func=_run)
