"""``phiclip push``: upload a PhiClip model (projector, adapter, code, processor, card) to the Hub in one commit.

The card's examples are answered by the model itself at push time. By default they are the
first records with images of the run's evaluation data (or its training data). Its evaluation results
(:mod:`publish.results`) are, by default, the run's own ``phiclip eval`` results (:func:`run_result_files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import constants

from chat.assistant import GenerationSettings, VisionChat
from data.images import ImageResolver
from data.sources import is_dataset_source, read_records
from processing_phiclip import IMAGE_TOKEN
from publish.card import Example, model_card
from publish.results import Score, read_all
from runtime.config import load_config

EXAMPLES_DIR = "examples"


def example_questions(data: str | Path, images: str | Path, n: int) -> list[tuple[Path, str]]:
    """The first ``n`` records with one image: (image path, first question without the marker)."""
    records, _ = read_records(data)
    resolver = ImageResolver(str(images))
    out = []
    for record in records:
        if len(record.images) != 1:
            continue
        if not isinstance(record.images[0], str):
            raise ValueError(f"{data}: card examples are image files; this dataset embeds its images "
                             "(give --examples a LLaVA JSON and --images its folder)")
        question = next(t.content for t in record.turns if t.role == "user").replace(IMAGE_TOKEN, "").strip()
        out.append((Path(resolver.resolve(record.images[0])), question))
        if len(out) == n:
            break
    return out


def default_examples(source: str | Path, n: int) -> list[tuple[Path, str]]:
    """Examples from a training run's config (its eval data, else its training data); none otherwise."""
    run_config = Path(source) / "config.yaml"
    if not run_config.is_file():
        return []
    cfg = load_config(run_config)
    data = cfg.data.eval or cfg.data.train
    if not data or not Path(data).is_file() or is_dataset_source(data):  # a dataset embeds its images: no files
        return []
    return example_questions(data, cfg.data.images, n)


def run_result_files(source: str | Path) -> list[Path]:
    """The ``phiclip eval`` results a run directory holds: its own evaluation (the demo's ``eval.json``, else a
    ``metrics.json`` written into the run by ``phiclip eval --out``), then ``eval/*/metrics.json`` (``phiclip
    eval``'s default folders), sorted; none for anything but a directory."""
    run = Path(source)
    if not run.is_dir():
        return []
    own = [path for path in (run / "eval.json", run / "metrics.json") if path.is_file()][:1]
    return own + sorted(run.glob("eval/*/metrics.json"))


def answered_card(
    chat: VisionChat, repo_id: str, examples: list[tuple[Path, str]], *, datasets: list[str] | None = None,
    license: str = "mit", max_new_tokens: int = 48, base_models: list[str] | None = None,
    scores: Sequence[Score] = (),
) -> tuple[str, dict[str, Path]]:
    """The model card, its examples answered by the model now, and the example images (repo path -> file);
    ``scores`` go into its metadata and results table (:func:`publish.card.model_card`)."""
    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    written: list[Example] = []
    files: dict[str, Path] = {}
    for i, (image_path, question) in enumerate(examples):
        answer = chat.answer([{"role": "user", "content": question}], image_path, settings)
        name = f"{EXAMPLES_DIR}/{i}{Path(image_path).suffix.lower() or '.png'}"
        files[name] = Path(image_path)
        written.append(Example(name, question, answer))
    card = model_card(repo_id, chat.model.config, written, constants.ENDPOINT, datasets, license, chat.n_image_tokens,
                      base_models, scores)
    return str(card), files


def push(
    source: str | Path,
    repo_id: str,
    examples: list[tuple[Path, str]] | None = None,
    *,
    datasets: list[str] | None = None,
    license: str = "mit",
    private: bool | None = None,
    token: str | None = None,
    results: Sequence[str | Path] | None = None,
):
    """Push the model at ``source`` (run directory, PhiClip folder or repo id) to ``repo_id``; returns the commit.

    ``results``: lmms-eval ``*_results.json`` and ``phiclip eval`` ``metrics.json`` files for the card (``None``:
    :func:`run_result_files`). They are read before the model is loaded: a file that cannot be read raises
    ``ValueError`` naming it, and nothing is pushed.
    """
    scores = read_all(run_result_files(source) if results is None else results)
    chat = VisionChat.load(source)
    examples = default_examples(source, 3) if examples is None else examples
    card, files = answered_card(chat, repo_id, examples, datasets=datasets, license=license, scores=scores)
    return chat.model.push_to_hub(repo_id, processor=chat.processor, model_card=card, extra_files=files,
                                  private=private, token=token)
