"""``phiclip data check``: validate a dataset without training."""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from data.images import ImageResolver
from data.records import Record, Report
from data.sources import images_dir, read_records
from processing_phiclip import IMAGE_TOKEN, ImageError, open_image, prepare_image

SPELLED = "text spells a special token of the tokenizer (kept; trained on as plain text)"


def spelled_special_tokens(record: Record, specials: set[str]) -> bool:
    """Whether any turn's text spells one of ``specials`` (an ``<image>`` marker in a user turn is not text)."""
    for turn in record.turns:
        text = turn.content.replace(IMAGE_TOKEN, "") if turn.role == "user" else turn.content
        if any(token in text for token in specials):
            return True
    return False


def check_dataset(data: str | Path, images: str | Path = "", tokenizer: str | None = None,
                  system_prompt: str | None = None) -> Report:
    """Parse every record and fully decode (and prepare) every image it references; problems go in the report.

    ``data`` is LLaVA JSON/JSONL or a dataset (:mod:`data.hf_records`); ``images`` defaults to a local
    dataset's folder.

    With ``tokenizer`` (a name, path or ``offline:NAME``), its chat template is checked first, as ``phiclip
    train`` checks it (:func:`data.template.check_chat_template`, with ``system_prompt``): a template that cannot
    render a training conversation raises ``ValueError`` naming the tokenizer and the setting before any record
    is read. Records whose text spells one of its special tokens (or ``<image>`` outside a user turn) are
    counted as a note: they are kept and trained on as text.
    """
    specials: set[str] = set()
    if tokenizer:
        from transformers import AutoTokenizer, CLIPImageProcessor

        from data.template import check_chat_template
        from processing_phiclip import PhiClipProcessor
        from runtime.models import resolve

        tok = AutoTokenizer.from_pretrained(resolve(tokenizer))
        specials = {t.content for t in tok.added_tokens_decoder.values() if t.special} | {IMAGE_TOKEN}
        check_chat_template(PhiClipProcessor.from_parts(CLIPImageProcessor(), tok, system_prompt), system_prompt)
    records, report = read_records(data)
    resolver = ImageResolver(images_dir(data, images))
    kept = 0
    for record in tqdm(records, desc="checking images", unit="rec", mininterval=1):
        try:
            for image in record.images:
                prepare_image(open_image(resolver.source(image)))
        except ImageError as err:
            report.skip(str(data), record.id, str(err))
            continue
        if specials and spelled_special_tokens(record, specials):
            report.note(SPELLED)
        kept += 1
    report.n_kept = kept
    return report
