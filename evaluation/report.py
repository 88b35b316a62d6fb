"""``metrics.json``, a self-contained ``report.html``, ``answers.jsonl``, and a comparison table.

The HTML report needs no other file: images and the loss curve are embedded as base64
data URLs.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from data.images import RowImage
from evaluation.evaluate import EvalResult

N_SAMPLES = 48
THUMBNAIL = 192
_SKIP_KEYS = {"by_type", "by_type_n", "data", "images", "run", "prompt_suffix", "metric"}
_NOT_COMPARED = {"n_skipped", "max_new_tokens", "unanswered"}


def _png_data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def thumbnail_data_url(path: str | Path | RowImage, size: int = THUMBNAIL) -> str | None:
    """A small PNG of the image (a file, or one embedded in a dataset), upright and in RGB, as a data URL
    (``None`` if it cannot be read)."""
    from processing_phiclip import ImageError, open_image, prepare_image

    try:
        source = path.read() if isinstance(path, RowImage) else path
        image = prepare_image(open_image(source), aspect="crop")  # "crop": the whole picture, the image processor crops
    except ImageError:
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return _png_data_url(buf.getvalue())


def loss_curve_png(history: list[dict]) -> bytes | None:
    """Training (and validation) loss against step from a trainer log history, as PNG bytes."""
    from train.plots import plot_losses

    buf = io.BytesIO()
    return buf.getvalue() if plot_losses(history, buf) else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _samples(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Worst first: lowest score, then wrong before right; ties keep the data order."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("score", 0.0), bool(rows[i].get("correct")), i))
    return [rows[i] for i in order[:n]]


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; }
table.kv th { text-align: left; padding: 2px 14px 2px 0; font-weight: 600; }
table.kv td { font-family: ui-monospace, monospace; }
table.items td, table.items th { border: 1px solid #ddd; padding: 6px; vertical-align: top; }
table.items th { background: #f4f4f4; }
tr.wrong td.answer { background: #fdecea; } tr.right td.answer { background: #e8f5e9; }
td.meta, div.meta { font-size: 0.85em; color: #666; }
table.items img { min-width: 96px; image-rendering: pixelated; }
.muted { color: #888; }
"""


def render_html(result: EvalResult, run_dir: Path | None = None, n_samples: int = N_SAMPLES) -> str:
    m = result.metrics
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>phiclip eval</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>phiclip evaluation</h1>",
        _table([("run", m.get("run") or (str(run_dir) if run_dir else "-")), ("data", m.get("data", "-")),
                ("metric", m.get("metric")), ("items", m.get("n")), ("skipped", m.get("n_skipped", 0))]),
        "<h2>Metrics</h2>",
        _table([(k, v) for k, v in m.items() if k not in _SKIP_KEYS and k not in ("n", "n_skipped")]),
    ]
    if m.get("by_type"):
        counts = m.get("by_type_n", {})
        label = "CIDEr" if m.get("metric") == "caption" else "accuracy"
        parts.append(f"<h2>By question type ({label})</h2>")
        parts.append(_table([(f"{k} (n={counts.get(k, '?')})", v) for k, v in m["by_type"].items()]))
    history_file = run_dir / "log_history.json" if run_dir else None
    if history_file is not None and history_file.is_file():
        try:
            png = loss_curve_png(json.loads(history_file.read_text()))
        except (ValueError, KeyError, TypeError):
            png = None
        if png:
            parts.append("<h2>Training</h2>")
            parts.append(f"<img alt='loss curve' src='{_png_data_url(png)}'>")
    shown = _samples(result.rows, n_samples)
    parts.append(f"<h2>Items ({len(shown)} of {len(result.rows)}, worst first)</h2>")
    parts.append("<table class='items'><tr><th>image</th><th>question</th><th>answer</th><th>reference</th>"
                 "<th>score</th></tr>")
    for row in shown:
        image = "<span class='muted'>none</span>"
        if row.get("image"):
            url = thumbnail_data_url(result.embedded.get(row["image"], row["image"]))
            image = f"<img alt='' src='{url}'>" if url else "<span class='muted'>unreadable</span>"
        refs = row.get("references") or []
        ref_text = refs[0] if len(refs) == 1 else "; ".join(dict.fromkeys(refs))
        css = "right" if row.get("correct") else "wrong"
        meta = html.escape(str(row.get("id")))
        if row.get("question_type"):
            meta += f" &middot; {html.escape(str(row['question_type']))}"
        parts.append(
            f"<tr class='{css}'><td>{image}</td>"
            f"<td>{html.escape(row.get('question') or '')}<div class='meta'>{meta}</div></td>"
            f"<td class='answer'>{html.escape(row.get('answer') or '')}</td>"
            f"<td>{html.escape(ref_text)}</td><td>{html.escape(_fmt(row.get('score', 0.0)))}</td></tr>"
        )
    parts.append("</table>")
    if result.report.problems:
        parts.append(f"<h2>Skipped ({len(result.report.problems)})</h2><ul>")
        parts.extend(f"<li>{html.escape(str(p))}</li>" for p in result.report.problems[:50])
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(result: EvalResult, out_dir: Path, run_dir: Path | None = None) -> Path:
    """Write ``metrics.json``, ``answers.jsonl`` and ``report.html`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result.metrics, indent=1))
    with (out / "answers.jsonl").open("w", encoding="utf-8") as f:
        for row in result.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    if run_dir is None and result.metrics.get("run"):
        candidate = Path(result.metrics["run"])
        run_dir = candidate if candidate.is_dir() else None
    page = out / "report.html"
    page.write_text(render_html(result, Path(run_dir) if run_dir else None), encoding="utf-8")
    return page


# --- comparing runs -------------------------------------------------------------------


def find_metrics(target: str | Path) -> list[Path]:
    """``metrics.json`` files named by ``target``: the file itself, a folder holding one, or a run
    directory's ``eval/*/metrics.json``."""
    path = Path(target)
    if path.is_file():
        return [path]
    if (path / "metrics.json").is_file():
        return [path / "metrics.json"]
    found = sorted(path.glob("eval/*/metrics.json"))
    if not found:
        raise FileNotFoundError(f"no metrics.json in {path} (nor in {path}/eval/*/)")
    return found


def compare_table(targets: list[str | Path]) -> str:
    """One plain-text table, a row per metrics.json: headline numbers and per-type accuracies."""
    entries = []
    for target in targets:
        for file in find_metrics(target):
            metrics = json.loads(file.read_text())
            name = str(file.parent if file.parent.name != "" else file)
            entries.append((name, metrics))
    columns = ["metric", "n", "score", "exact_match"]
    for _, m in entries:
        for key, value in m.items():
            wanted = isinstance(value, (int, float)) and not key.endswith("_s")
            if wanted and key not in columns and key not in _SKIP_KEYS and key not in _NOT_COMPARED:
                columns.append(key)
    types = sorted({t for _, m in entries for t in m.get("by_type", {})})
    header = ["eval", *columns, *(f"type:{t}" for t in types)]
    lines = []
    for name, m in entries:
        cells = [name] + [_fmt(m.get(c, "-")) for c in columns]
        cells += [_fmt(m.get("by_type", {}).get(t, "-")) for t in types]
        lines.append(cells)
    widths = [max(len(str(r[i])) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(r) for r in lines)])
