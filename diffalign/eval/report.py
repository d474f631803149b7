"""One self-contained HTML evaluation report: settings, win-rate table, matplotlib plots and image grids.

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


def training_curves_figure(curves: dict[str, list[dict]]) -> bytes | None:
    """PNG of training metrics against step, one subplot per metric and one line per run.

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
                ax.plot(xs, ys, linewidth=1.2, label=_plain(label))
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
) -> Path:
    """Write the HTML report to ``path`` (atomically) and return that path.

    ``results`` is the content of ``results.json`` (``models`` and ``comparisons``), ``scores`` the per-image
    scores for the distribution plot, ``curves`` each training run's metrics rows and ``grids`` image files.
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
        _grids_section(grids),
    ]
    body = "\n".join(s for s in sections if s)
    text = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
    write_text_atomic(path, text)
    return path
