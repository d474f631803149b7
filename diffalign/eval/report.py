"""One self-contained HTML evaluation report: settings, win-rate table, matplotlib plots, a per-prompt view
(every model's images of one prompt side by side with their scores, paged with buttons or the arrow keys) and
the image grids.

Everything is inline (CSS in a ``<style>`` element, images as base64 ``data:`` URIs), so the file can be
mailed or archived on its own. Figures are rendered with matplotlib's object API on an Agg canvas; the
global pyplot state and the process-wide backend are left untouched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from diffalign.checkpoint import write_text_atomic

DPI = 100
SUBPLOTS_PER_ROW = 3
SKIPPED_METRICS = ("step", "steps_per_s")
MAX_PNG_EMBED_BYTES = 2_000_000  # larger grids are re-encoded as JPEG
JPEG_QUALITY = 90
MEAN_FORMAT = ".5g"   # rewards live on very different scales (HPSv2 ~0.27, PickScore ~21)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
td.better { background: #d9f2d9; }
td.worse { background: #f6d5d5; }
img { max-width: 100%; display: block; margin: 0.5em 0; }
figcaption { color: #555; font-size: 0.9em; }
.prompt-nav { display: flex; gap: 0.5em; align-items: center; margin: 0.5em 0; }
.prompt-view table img { width: THUMBpx; height: auto; margin: 0; }
.prompt-view .score { font-size: 0.85em; color: #444; }
.js .prompt-view { display: none; }
.js .prompt-view.shown { display: block; }
"""
THUMB = 192          # px: the long side of the per-prompt view's images
PAGER = """
document.documentElement.classList.add("js");
window.addEventListener("DOMContentLoaded", function () {
  var views = document.querySelectorAll(".prompt-view");
  var pick = document.getElementById("prompt-pick");
  if (!views.length || !pick) return;
  var at = 0;
  function show(k) {
    at = (k + views.length) % views.length;
    views.forEach(function (v, i) { v.classList.toggle("shown", i === at); });
    pick.value = String(at);
    document.getElementById("prompt-count").textContent = (at + 1) + " / " + views.length;
  }
  document.getElementById("prompt-prev").addEventListener("click", function () { show(at - 1); });
  document.getElementById("prompt-next").addEventListener("click", function () { show(at + 1); });
  pick.addEventListener("change", function () { show(parseInt(pick.value, 10)); });
  document.addEventListener("keydown", function (e) {
    if (e.target === pick) return;
    if (e.key === "ArrowLeft") show(at - 1);
    if (e.key === "ArrowRight") show(at + 1);
  });
  show(0);
});
"""


def _png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _subplots(count: int, width: float = 4.5, height: float = 3.4) -> tuple[Figure, list[Any]]:
    """A figure with ``count`` axes laid out in rows of up to ``SUBPLOTS_PER_ROW``; unused axes are hidden."""
    ncols = min(count, SUBPLOTS_PER_ROW)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _plain(text: str) -> str:
    """``text`` for a matplotlib label, with ``$`` escaped so it is never parsed as mathtext."""
    return str(text).replace("$", r"\$")


def _finite(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if math.isfinite(v)]


def score_distribution_figure(scores: dict[str, dict[str, list[float]]]) -> bytes | None:
    """PNG of per-model score histograms, one subplot per reward; None when ``scores`` is empty.

    ``scores[reward][model_label]`` is the list of per-image scores. Models share bins within a reward
    and are overlaid as step histograms.
    """
    if not scores:
        return None
    fig, axes = _subplots(len(scores))
    for ax, (reward, by_model) in zip(axes, scores.items(), strict=True):
        clean = {label: _finite(values) for label, values in by_model.items()}
        pooled = [v for values in clean.values() for v in values]
        bins = _shared_bins(pooled)
        for label, values in clean.items():
            if values:
                ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=_plain(label))
        ax.set_title(_plain(reward))
        ax.set_xlabel("score")
        ax.set_ylabel("images")
        if pooled:
            ax.legend(fontsize="small")
    return _png_bytes(fig)


def _shared_bins(values: list[float]) -> list[float] | int:
    """Common histogram bin edges for all models of one reward (about 2 * cbrt(n) bins, 5 to 40)."""
    if not values:
        return 10
    lo, hi = min(values), max(values)
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    count = max(5, min(40, round(2 * len(values) ** (1 / 3))))
    return [lo + (hi - lo) * k / count for k in range(count + 1)]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _metric_names(curves: dict[str, list[dict]]) -> list[str]:
    """Numeric metrics present in any row, in first-seen order, without step/steps_per_s and with lr last."""
    names: dict[str, None] = {}
    for rows in curves.values():
        for row in rows:
            names.update((k, None) for k, v in row.items() if k not in SKIPPED_METRICS and _is_number(v))
    ordered = [name for name in names if name != "lr"]
    return ordered + ["lr"] if "lr" in names else ordered


def smoothed(values: list[float], weight: float | None = None) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing); the weight grows with the number of points,
    0 for fewer than 5 (raw), up to 0.9 for 200 or more."""
    if weight is None:
        weight = 0.0 if len(values) < 5 else min(0.9, 1 - 5 / len(values))
    out, mean, norm = [], 0.0, 0.0
    for v in values:
        mean, norm = weight * mean + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(mean / norm)
    return out


def training_curves_figure(curves: dict[str, list[dict]]) -> bytes | None:
    """PNG of training metrics against step, one subplot per metric and one line per run: the logged values
    faint, their smoothed curve (:func:`smoothed`) bold.

    ``curves[run_label]`` holds the rows of that run's ``metrics.jsonl``. Returns None when there are no
    rows (or no numeric metrics in them).
    """
    metrics = _metric_names(curves)
    if not metrics:
        return None
    fig, axes = _subplots(len(metrics), width=4.2, height=3.0)
    for ax, metric in zip(axes, metrics, strict=True):
        for label, rows in curves.items():
            points = [(row.get("step", k), row[metric]) for k, row in enumerate(rows) if _is_number(row.get(metric))]
            if points:
                xs, ys = zip(*points, strict=True)
                raw = ax.plot(xs, ys, linewidth=0.8, alpha=0.35)[0]
                ax.plot(xs, smoothed(list(ys)), linewidth=1.6, color=raw.get_color(), label=_plain(label))
        ax.set_title(_plain(metric))
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    return _png_bytes(fig)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _grid_uri(path: Path) -> str:
    """A grid image as a data URI: PNG/JPEG files verbatim when small enough, else re-encoded as JPEG."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" or (image.format == "PNG" and len(data) <= MAX_PNG_EMBED_BYTES):
            return _data_uri(data, Image.MIME[image.format])
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; ``rows`` hold ready-made ``<td>`` cells, ``header`` plain text."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "\n".join(f"<tr>{''.join(cells)}</tr>" for cells in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _td(text: Any, css_class: str = "") -> str:
    attr = f' class="{css_class}"' if css_class else ""
    return f"<td{attr}>{_esc(text)}</td>"


def _is_interval(ci: Any) -> bool:
    return isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(c) for c in ci)


def _with_ci(value: Any, ci: Any, fmt: str = ".3f") -> str:
    """``0.610 [0.520, 0.700]``; just the value without a valid interval; ``n/a`` for a missing value."""
    if not _is_number(value):
        return "n/a"
    if not _is_interval(ci):
        return f"{value:{fmt}}"
    return f"{value:{fmt}} [{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _verdict(ci: Any) -> str:
    """CSS class for a win-rate cell: the whole interval above 0.5 (better), below 0.5 (worse), or none."""
    if not _is_interval(ci):
        return ""
    if ci[0] > 0.5:
        return "better"
    return "worse" if ci[1] < 0.5 else ""


def _counts(comparison: dict) -> str:
    """``wins / losses / ties``, or ``n/a`` when the counts are missing."""
    counts = [comparison.get(key) for key in ("wins", "losses", "ties")]
    return " / ".join(str(c) for c in counts) if all(_is_number(c) for c in counts) else "n/a"


def _settings_section(settings: dict) -> str:
    rows = [
        [_td(key), _td(value if isinstance(value, str) else json.dumps(value, default=str))]
        for key, value in settings.items()
    ]
    return "<h2>Settings</h2>\n" + _table(["setting", "value"], rows)


def _comparison_section(comparisons: list[dict], ci: str) -> str:
    if not comparisons:
        return "<h2>Win rates against the base model</h2>\n<p>No checkpoint was compared with the base model.</p>"
    header = ["checkpoint", "reward", "n", f"win rate [{ci}]", "base mean [CI]", "checkpoint mean [CI]",
              "paired difference [CI]", "W / L / T"]
    rows = [
        [
            _td(c.get("checkpoint", "")),
            _td(c.get("reward", "")),
            _td(c.get("n", "")),
            _td(_with_ci(c.get("win_rate"), c.get("win_rate_ci")), _verdict(c.get("win_rate_ci"))),
            _td(_with_ci(c.get("base_mean"), c.get("base_mean_ci"), MEAN_FORMAT)),
            _td(_with_ci(c.get("mean"), c.get("mean_ci"), MEAN_FORMAT)),
            _td(_with_ci(c.get("mean_diff"), c.get("mean_diff_ci"), MEAN_FORMAT)),
            _td(_counts(c)),
        ]
        for c in comparisons
    ]
    note = (
        "<p>Win rate: share of paired images (same prompt and seed) where the checkpoint scores higher than the "
        "base model, ties counted as half. Green: the whole interval is above 0.5; red: below 0.5. Paired "
        "difference: the mean of (checkpoint - base) over the same pairs, the effect size to read next to it.</p>"
    )
    return "<h2>Win rates against the base model</h2>\n" + note + "\n" + _table(header, rows)


def _models_section(models: dict[str, dict], ci: str) -> str:
    rewards = list(dict.fromkeys(reward for by_reward in models.values() for reward in by_reward))
    if not rewards:
        return ""
    rows = [
        [_td(label)]
        + [_td(_with_ci(stats.get(r, {}).get("mean"), stats.get(r, {}).get("ci"), MEAN_FORMAT)) for r in rewards]
        for label, stats in models.items()
    ]
    return f"<h2>Mean scores [{ci}]</h2>\n" + _table(["model", *rewards], rows)


def _figure_section(title: str, png: bytes | None, missing: str) -> str:
    if png is None:
        return f"<h2>{_esc(title)}</h2>\n<p>{_esc(missing)}</p>"
    return f'<h2>{_esc(title)}</h2>\n<img src="{_data_uri(png, "image/png")}" alt="{_esc(title)}">'


def _thumb_uri(path: Path) -> str:
    with Image.open(path) as img:
        img = img.convert("RGB")
        img.thumbnail((THUMB, THUMB))
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", quality=85)
    return _data_uri(buffer.getvalue(), "image/jpeg")


def _prompt_section(records: list[dict], scores: dict[str, list[float]], image_root: Path) -> str:
    """Per prompt: a table with one row per seed and one column per model (base first), each cell the image and
    its scores; one prompt shown at a time, paged with Previous / Next, a list, or the arrow keys (all of them
    shown when scripts are off)."""
    if not records:
        return ""
    models = list(dict.fromkeys(r["checkpoint"] for r in records))
    prompts: dict[int, dict] = {}
    for i, r in enumerate(records):
        entry = prompts.setdefault(r["prompt_index"], {"prompt": r["prompt"], "cells": {}})
        entry["cells"][(r["seed"], r["checkpoint"])] = i
    options, views = [], []
    for k, (index, entry) in enumerate(sorted(prompts.items())):
        options.append(f'<option value="{k}">{index}: {_esc(entry["prompt"][:80])}</option>')
        seeds = sorted({seed for seed, _ in entry["cells"]})
        rows = []
        for seed in seeds:
            cells = []
            for model in models:
                i = entry["cells"].get((seed, model))
                if i is None:
                    cells.append("<td>-</td>")
                    continue
                path = Path(records[i]["path"])
                path = path if path.is_absolute() or path.exists() else image_root / path
                text = " ".join(f"{_esc(label)} {values[i]:{MEAN_FORMAT}}" for label, values in scores.items())
                cells.append(f'<td><img src="{_thumb_uri(path)}" alt="{_esc(model)} seed {seed}">'
                             f'<div class="score">{text}</div></td>')
            rows.append(f"<tr><th>seed {seed}</th>{''.join(cells)}</tr>")
        header = "<tr><th></th>" + "".join(f"<th>{_esc(m)}</th>" for m in models) + "</tr>"
        views.append(f'<section class="prompt-view" data-prompt="{index}"><h3>{index}: {_esc(entry["prompt"])}'
                     f"</h3><table>{header}{''.join(rows)}</table></section>")
    nav = ('<div class="prompt-nav"><button id="prompt-prev" type="button">&larr; Previous</button>'
           f'<select id="prompt-pick">{"".join(options)}</select><button id="prompt-next" type="button">'
           'Next &rarr;</button><span id="prompt-count"></span></div>')
    return "<h2>Per prompt</h2>\n" + nav + "\n" + "\n".join(views)


def _grids_section(grids: list[Path]) -> str:
    if not grids:
        return ""
    figures = [
        f'<figure><img src="{_grid_uri(Path(p))}" alt="{_esc(Path(p).name)}">'
        f"<figcaption>{_esc(Path(p).name)}</figcaption></figure>"
        for p in grids
    ]
    return "<h2>Image grids</h2>\n" + "\n".join(figures)


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    settings: dict,
    results: dict,
    grids: list[Path],
    scores: dict[str, dict[str, list[float]]],
    curves: dict[str, list[dict]],
    records: list[dict] | None = None,
    record_scores: dict[str, list[float]] | None = None,
) -> Path:
    """Write the HTML report to ``path`` (atomically) and return that path.

    ``results`` is the content of ``results.json`` (``models`` and ``comparisons``), ``scores`` the per-image
    scores for the distribution plot, ``curves`` each training run's metrics rows and ``grids`` image files;
    ``records`` (the images' metadata rows) with ``record_scores`` (reward label -> one score per record) add the
    per-prompt view.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    confidence = settings.get("confidence", 0.95)
    ci = f"{confidence:.0%} CI" if _is_number(confidence) else "CI"
    sections = [
        f"<h1>{_esc(title)}</h1>",
        _settings_section(settings),
        _comparison_section(results.get("comparisons", []), ci),
        _models_section(results.get("models", {}), ci),
        _figure_section("Score distributions", score_distribution_figure(scores), "No scores were recorded."),
        _figure_section("Training curves", training_curves_figure(curves), "No training logs were found."),
        _prompt_section(records or [], record_scores or {}, path.parent),
        _grids_section(grids),
    ]
    body = "\n".join(s for s in sections if s)
    text = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{STYLE.replace('THUMB', str(THUMB))}</style>\n"
        f"<script>{PAGER}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    write_text_atomic(path, text)
    return path
