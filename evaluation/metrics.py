"""Answer metrics: VQA accuracy, exact match, yes/no (POPE-style) and captioning scores.

VQA answer normalisation follows the procedure described for the VQA challenge
evaluation: lowercase; periods removed unless they are a decimal point; commas between
digits removed; every other punctuation mark except apostrophe and colon replaced by a
space; number words turned into digits; articles (a, an, the) dropped; contractions
missing their apostrophe repaired ("dont" -> "don't"). A prediction's VQA accuracy is
``min(#references equal to it / 3, 1)``; with the usual ten human answers it is averaged
over the ten subsets of nine (leave one annotator out), as the challenge does.

BLEU-4, ROUGE-L and CIDEr(-D) come from ``pycocoevalcap``'s scorers, called directly on
text tokenised here (lowercased words without punctuation), because its PTB tokenizer
needs Java.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from collections.abc import Sequence

# --- normalisation -----------------------------------------------------------------

_NUMBERS = {
    "none": "0",  # the challenge's normaliser reads "none" as a count
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}

# Contractions in their written form; every spelling of one with some apostrophes left
# out is mapped back to it. Spellings that are ordinary words ("well", "its", "were")
# are not touched.
_CONTRACTIONS_TEXT = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've
hasn't haven't he'd he'd've he'll he's how'd how'll how's i'd i'd've i'll i'm i've isn't
it'd it'd've it'll it's let's ma'am mightn't mightn't've might've mustn't must've
needn't not've o'clock oughtn't shan't she'd she'd've she'll she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've
someone'll someone's something'd something'd've something'll something's that'd
that'll that's there'd there'd've there're there's they'd they'd've they'll they're
they've wasn't we'd we'd've we'll we're we've weren't what'll what're what's what've
when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'd've you'd you'd've you'll
you're you've
"""
_CONTRACTIONS = _CONTRACTIONS_TEXT.split()
_ORDINARY_WORDS = {"hell", "well", "were", "shell", "its", "ill", "shed", "wed", "id", "lets", "wont", "cant", "whore"}


def _contraction_table() -> dict[str, str]:
    table: dict[str, str] = {}
    for word in _CONTRACTIONS:
        pieces = word.split("'")
        # Each apostrophe either kept or dropped; all but the all-kept spelling are repaired.
        for keep in itertools.product((True, False), repeat=len(pieces) - 1):
            if all(keep):
                continue
            spelled = pieces[0] + "".join(("'" if k else "") + p for k, p in zip(keep, pieces[1:]))
            if spelled not in _ORDINARY_WORDS:
                table.setdefault(spelled, word)
    return table


_CONTRACTION_FIX = _contraction_table()
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")
# Periods were dealt with above; apostrophe and colon stay.
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/;<=>?@\[\\\]^_`{|}~]")


def normalize_answer(text: str) -> str:
    """VQA-style normalised answer (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_FIX.get(word, word))
    return " ".join(words)


# --- VQA accuracy and exact match ----------------------------------------------------


def vqa_accuracy(answer: str, references: Sequence[str]) -> float:
    """``min(matches / 3, 1)``, averaged over leave-one-out subsets when there are ten references.

    With fewer than three references a single match cannot reach three; the divisor is
    then the number of references, so a set with one reference scores 0 or 1.
    """
    if not references:
        return 0.0
    pred = normalize_answer(answer)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 10:
        total = 0.0
        for left_out in range(len(refs)):
            matches = sum(r == pred for i, r in enumerate(refs) if i != left_out)
            total += min(matches / 3.0, 1.0)
        return total / len(refs)
    matches = sum(r == pred for r in refs)
    return min(matches / min(3.0, len(refs)), 1.0)


def exact_match(answer: str, references: Sequence[str]) -> float:
    """1.0 if the normalised answer equals any normalised reference."""
    pred = normalize_answer(answer)
    return float(any(pred == normalize_answer(r) for r in references))


# --- yes/no -----------------------------------------------------------------------------

_NEGATIONS = {"no", "not", "none", "nope", "never", "nothing", "neither", "nor", "0"}


def yes_no(text: str) -> str | None:
    """``"yes"``/``"no"`` read off a free-form answer (POPE style), ``None`` for an empty one.

    The first word decides when it is yes or no; otherwise any negation makes it "no",
    and anything else counts as "yes".
    """
    words = normalize_answer(text).split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if any(w in _NEGATIONS or w.endswith("n't") for w in words):
        return "no"
    return "yes"


def is_yes_no(reference: str) -> bool:
    return normalize_answer(reference) in ("yes", "no")


def yes_no_metrics(predictions: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes" answers."""
    if len(predictions) != len(labels):
        raise ValueError("predictions and labels differ in length")
    tp = sum(p == "yes" and y == "yes" for p, y in zip(predictions, labels))
    fp = sum(p == "yes" and y != "yes" for p, y in zip(predictions, labels))
    fn = sum(p != "yes" and y == "yes" for p, y in zip(predictions, labels))
    correct = sum(p == y for p, y in zip(predictions, labels))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in predictions) / n if n else 0.0,
        "unanswered": sum(p is None for p in predictions),
    }


# --- captions ---------------------------------------------------------------------------

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_tokens(text: str) -> str:
    """Lowercased words without punctuation, space-joined (what the COCO scorers expect)."""
    return " ".join(_WORD.findall(text.lower()))


def caption_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Corpus BLEU-4, ROUGE-L and CIDEr-D, plus per-item scores.

    CIDEr weighs n-grams by their document frequency across the references, so it needs
    a corpus: on a single item every n-gram is in every "document" and CIDEr is 0.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from err
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {"bleu4": 0.0, "rouge_l": 0.0, "cider": 0.0}, []
    keys = [str(i) for i in range(len(predictions))]
    res = {k: [caption_tokens(p) or "_"] for k, p in zip(keys, predictions)}
    gts = {k: [caption_tokens(r) or "_" for r in refs] or ["_"] for k, refs in zip(keys, references)}
    with contextlib.redirect_stdout(io.StringIO()):  # the BLEU scorer prints its n-gram counts
        bleu, bleu_items = Bleu(4).compute_score(gts, res)
        rouge, rouge_items = Rouge().compute_score(gts, res)
        cider, cider_items = Cider().compute_score(gts, res)
    per_item = [
        {"bleu4": float(b), "rouge_l": float(r), "cider": float(c)}
        for b, r, c in zip(bleu_items[3], rouge_items, cider_items)
    ]
    return {"bleu4": float(bleu[3]), "rouge_l": float(rouge), "cider": float(cider)}, per_item


# --- choosing a metric ------------------------------------------------------------------

METRICS = ("auto", "vqa", "exact", "caption", "yesno", "choice")
CAPTION_WORDS = 5


def choose_metric(references: Sequence[Sequence[str]]) -> str:
    """``yesno`` if every reference is yes/no, ``caption`` if references are long (median of at
    least five words), ``vqa`` when items carry several reference answers, else ``exact``."""
    flat = [r for refs in references for r in refs]
    if not flat:
        return "exact"
    if all(is_yes_no(r) for r in flat):
        return "yesno"
    lengths = sorted(len(normalize_answer(r).split()) for r in flat)
    if lengths[len(lengths) // 2] >= CAPTION_WORDS:
        return "caption"
    if any(len(refs) > 1 for refs in references):
        return "vqa"
    return "exact"
