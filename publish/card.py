"""The model card of a pushed PhiClip model: Hub metadata, widget examples with the model's real answers, usage,
and evaluation results.

The Hub's hosted widget does not run custom code, so the examples (image, question and the
answer this model gave when the card was written) are what visitors see. Evaluation results
(:mod:`publish.results`) go into the metadata as the Hub's ``model-index`` and into the body as a table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from publish.results import Score

# The oldest transformers release the remote code is tested with (tests/test_hub_versions.py, its oldest lane).
TESTED_4X = "4.57"
# The Hub task every result is filed under in the model-index: the model's own pipeline tag.
TASK_TYPE = "image-text-to-text"

_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A vision-language chat model: the vision tower of `{{ vision }}` feeds a Linear-GELU-Linear projector
whose outputs are spliced into the token embeddings of `{{ lm }}`, between the text before and after
the image. The projector and a LoRA adapter on the LM are this repository's own weights
(`projector.safetensors`, `adapter/`); the LM and the tower are loaded by name from their own repositories.

## Use

```python
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline
from PIL import Image

repo = "{{ repo_id }}"
revision = "main"  # pin a commit sha from the repository's history for reproducible results
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, revision=revision)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True, revision=revision)

image = Image.open("photo.jpg")
inputs = processor(images=image, text="What is in the picture?", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])

pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True, revision=revision)
messages = [{"role": "user", "content": [{"type": "image", "image": "photo.jpg"},
                                         {"type": "text", "text": "What is in the picture?"}]}]
print(pipe(text=messages, generate_kwargs={"max_new_tokens": 64}, return_full_text=False))
```

Generation settings go in `generate_kwargs` (the pipeline passes other keywords to the processor).
Also: `dtype=torch.bfloat16`, `device_map="auto"`, `attn_implementation=...`, a 4-bit
`quantization_config` for the base LM (QLoRA inference), `merge_adapter=True`.

**Text-only questions** go to the base LM with the adapter switched off, as the model was trained
to be used (`model.config.text_only_base_lm = False` sends them through the adapter too):

```python
chat = processor.tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}],
                                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**chat, max_new_tokens=64)
print(processor.decode(out[0, chat["input_ids"].shape[1]:], skip_special_tokens=True))
```

## Examples

Answers the model gave to these questions when this card was written (greedy decoding):

| image | question | answer |
|---|---|---|
{% for example in examples -%}
| ![]({{ example.src }}) | {{ example.question }} | {{ example.answer }} |
{% endfor %}
{% if results_table %}
## Evaluation

Scores as each harness reported them (accuracies are fractions of 1); *items*: how many questions were scored.
The same numbers are in this card's metadata (`model-index`).

{{ results_table }}
{% endif %}
## Details

- Image features: {{ image_features }}, {{ tokens }} positions per image.
- Tested with transformers {{ tested }}; needs `trust_remote_code=True`, `peft` for the adapter, and
  `bitsandbytes` only for 4-bit loading.
"""


def _is_repo_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def eval_results(scores: Sequence[Score]) -> list[EvalResult]:
    """One Hub ``EvalResult`` per score, under :data:`TASK_TYPE`, for the card's ``model-index``.

    The dataset is the Hub id (with config, split, revision) where the data is a Hub dataset, else the task name;
    where several tasks evaluate one Hub dataset (the model-index keeps one task and dataset name per dataset), each
    is filed under its task name instead. The dataset's name is the task; the metric's ``args`` say which harness
    and version computed it, the task's version and the number of items (``harness``, ``harness_version``,
    ``task_version``, ``n``; each only where known).
    """
    tasks: dict[tuple, set[str]] = defaultdict(set)
    for score in scores:
        tasks[(score.dataset, score.dataset_config, score.dataset_split, score.dataset_revision)].add(score.task)
    out = []
    for score in scores:
        shared = len(tasks[(score.dataset, score.dataset_config, score.dataset_split, score.dataset_revision)]) > 1
        args = {"harness": score.harness, "harness_version": score.harness_version,
                "task_version": score.task_version, "n": score.n}
        out.append(EvalResult(
            task_type=TASK_TYPE, dataset_type=score.task if shared else score.dataset, dataset_name=score.task,
            dataset_config=score.dataset_config, dataset_split=score.dataset_split,
            dataset_revision=score.dataset_revision, metric_type=score.metric, metric_value=score.value,
            metric_args={k: v for k, v in args.items() if v is not None},
        ))
    return out


def results_table(scores: Sequence[Score]) -> str:
    """A markdown table, a row per score: task, metric, value (4 decimals), items, harness and version, task
    version ("-" where unknown); empty without scores."""
    if not scores:
        return ""

    def cell(value: object) -> str:
        return "-" if value is None else str(value).replace("|", "\\|")

    lines = ["| task | metric | value | items | harness | task version |", "|---|---|---|---|---|---|"]
    for s in scores:
        harness = f"{s.harness} {s.harness_version}" if s.harness_version else s.harness
        lines.append(f"| {cell(s.task)} | {cell(s.metric)} | {s.value:.4f} | {cell(s.n)} | {cell(harness)} "
                     f"| {cell(s.task_version)} |")
    return "\n".join(lines)


@dataclass
class Example:
    image_file: str  # path inside the repository, e.g. examples/0.png
    question: str
    answer: str
    src: str = ""  # URL the Hub serves the image from


def model_card(
    repo_id: str,
    config,
    examples: list[Example],
    endpoint: str,
    datasets: list[str] | None = None,
    license: str = "mit",
    image_tokens: int | None = None,
    base_models: list[str] | None = None,
    scores: Sequence[Score] = (),
) -> ModelCard:
    """A card for ``repo_id`` whose widget shows ``examples`` (served from the repository itself).

    ``base_models`` defaults to the LM and the tower when they are Hub ids (local paths are left out).
    ``scores`` (:func:`publish.results.read_all`) become the metadata's ``model-index`` (:func:`eval_results`, the
    model named by the repository's name) and the body's results table (:func:`results_table`).
    """
    if base_models is None:
        base_models = [name for name in (config.text_model, config.vision_model) if _is_repo_id(name)]
    for example in examples:
        example.src = f"{endpoint}/{repo_id}/resolve/main/{example.image_file}"
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license,
        base_model=base_models or None,
        datasets=datasets or None,
        tags=["phiclip", "custom_code", "llava", "vision", "image-text-to-text"],
        widget=[{"src": e.src, "text": e.question, "output": {"text": e.answer}} for e in examples],
        model_name=repo_id.split("/")[-1] if scores else None,
        eval_results=eval_results(scores) or None,
    )
    return ModelCard.from_template(
        data,
        template_str=_TEMPLATE,
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        lm=config.text_model,
        vision=config.vision_model,
        examples=examples,
        image_features="CLIP's pooled, projected embedding" if config.image_features == "pooled"
        else f"hidden states of tower layer(s) {config.vision_feature_layer}",
        tokens=image_tokens,
        tested=f"{TESTED_4X}.x and {transformers.__version__}",
        results_table=results_table(scores),
    )
