"""Download LLaVA-Instruct conversations and COCO train2017 images.

``phiclip prepare llava-instruct --out DIR`` fetches the instruction-tuning
JSON from the Hugging Face Hub dataset ``liuhaotian/LLaVA-Instruct-150K``
(``llava_instruct_150k.json``, or ``llava_v1_5_mix665k.json`` with
``--mix665k``) and the COCO ``train2017.zip`` image archive, extracts the
archive and checks that every image the JSON refers to is on disk.

Layout of ``DIR``::

    DIR/
      llava_instruct_150k.json        the conversations (or llava_v1_5_mix665k.json)
      downloads/train2017.zip         the COCO archive (may be deleted after extraction)
      images/coco/train2017/*.jpg     extracted COCO images
      images/coco/.train2017.zip.extracted   marker: extraction finished
      .prepare-state.json             files already verified (size + sha256)

Image folder to train with (``PrepareSummary.images_dir``):

* 150k variant: ``DIR/images/coco/train2017`` -- the JSON names bare files
  such as ``000000033471.jpg``.
* 665k mix: ``DIR/images`` -- the JSON names ``coco/train2017/...``,
  ``gqa/images/...``, ``ocr_vqa/images/...``, ``textvqa/train_images/...`` and
  ``vg/VG_100K(_2)/...``. Only COCO is downloaded here; put the other image
  sets under ``DIR/images/`` yourself (the final check lists what is missing).

Downloads go to ``FILE.part`` and resume with an HTTP ``Range`` request; a
finished file is checked against its known size and sha256 (or the size the
server announced when none is pinned), and a file that fails the check is
deleted and fetched again a bounded number of times. Rerunning the command is
cheap: verified files are remembered in ``.prepare-state.json`` (only their
size is re-checked), and a finished extraction is remembered by its marker, so
the archive is neither re-downloaded nor re-extracted even if it was deleted.

Mirrors: ``--hub-url`` / ``$PHICLIP_HUB_URL`` (falls back to ``$HF_ENDPOINT``)
replaces ``https://huggingface.co``; ``--coco-url`` / ``$PHICLIP_COCO_URL``
replaces ``http://images.cocodataset.org/zips``.

This module runs the steps; each lives in its own module beside it: ``sources`` (what
to fetch), ``download`` and ``verify``, ``extract``, ``check``; ``cli`` is the command line.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from prepare.check import PrepareSummary, check_images
from prepare.common import PrepareError, human_size, log, write_json_atomic
from prepare.download import fetch_file
from prepare.extract import BadArchiveError, extract_zip, marker_path, marker_valid
from prepare.sources import RemoteFile, llava_instruct_sources, normalize_variant
from prepare.verify import State

DOWNLOADS_SUBDIR = "downloads"
IMAGES_SUBDIR = "images"
COCO_SUBDIR = "images/coco"  # train2017.zip holds train2017/<name>.jpg


def _warn_if_low_space(out_dir: Path, remote: RemoteFile, archive_path: Path) -> None:
    """Warn early when the archive plus its extracted contents will likely not fit."""
    if remote.size is None:
        return
    have = 0
    for p in (archive_path, archive_path.with_name(archive_path.name + ".part")):
        if p.is_file():
            have = max(have, p.stat().st_size)
    needed = (remote.size - have) + remote.size  # download + roughly the same again extracted
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError:
        return
    if needed > free:
        log(
            f"warning: {out_dir} has {human_size(free)} free; downloading and extracting "
            f"{remote.name} needs about {human_size(needed)}"
        )


def prepare_llava_instruct(
    out_dir: Path,
    *,
    variant: str = "150k",
    hub_url: str | None = None,
    coco_url: str | None = None,
    skip_images: bool = False,
) -> PrepareSummary:
    """Download (resumably) and verify the LLaVA-Instruct JSON and COCO train2017.

    ``hub_url``/``coco_url`` default to ``$PHICLIP_HUB_URL`` (or
    ``$HF_ENDPOINT``) / ``$PHICLIP_COCO_URL``, then to the official hosts.
    With ``skip_images`` the archive is not fetched; images already under
    ``out_dir/images`` are still checked. Prints the check's report and
    returns it; raises ``PrepareError`` on failure.
    """
    variant = normalize_variant(variant)
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrepareError(f"cannot create output folder {out_dir}: {e}") from None
    state = State(out_dir)
    coco_dir = out_dir / COCO_SUBDIR

    json_path: Path | None = None
    for remote in llava_instruct_sources(variant, hub_url=hub_url, coco_url=coco_url, skip_images=skip_images):
        if not remote.extract:
            json_path = fetch_file(remote, out_dir / remote.name, state)
            continue
        marker = marker_path(remote.name, coco_dir)
        if marker_valid(marker, remote):
            log(f"{remote.name}: already extracted into {coco_dir}, skipping")
            continue
        archive_path = out_dir / DOWNLOADS_SUBDIR / remote.name
        _warn_if_low_space(out_dir, remote, archive_path)
        archive = fetch_file(remote, archive_path, state)
        log(f"extracting {archive} into {coco_dir}")
        try:
            n = extract_zip(archive, coco_dir)
        except BadArchiveError:
            state.forget(archive)  # the next run verifies it again before trusting it
            raise
        entry = state.files.get(state.key(archive), {})
        write_json_atomic(
            marker,
            {
                "archive": remote.name,
                "size": entry.get("size", archive.stat().st_size),
                "sha256": entry.get("sha256"),
                "files": n,
                "extracted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            },
        )
        log(f"extracted {n} files; {archive} can be deleted to save space")

    assert json_path is not None
    images_dir = coco_dir / "train2017" if variant == "150k" else out_dir / IMAGES_SUBDIR
    summary = check_images(json_path, images_dir)
    print(summary.report(), flush=True)
    if summary.missing and variant == "mix665k":
        print(
            "note: only COCO train2017 is downloaded here; the 665k mix also needs the GQA, "
            f"OCR-VQA, TextVQA and Visual Genome images under {images_dir}/",
            flush=True,
        )
    return summary
