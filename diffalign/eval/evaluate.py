"""``diffalign eval``: score the samples with rewards, compare every checkpoint with the base, write the outputs.

Under ``output_dir``: ``results.json`` (settings; ``models``: per model and reward the mean with its interval;
``checkpoints[label][reward]``: the comparison with the base, also flat as the ``comparisons`` list),
``scores.jsonl`` (every image's scores), ``grids/grid_<page>.png`` and ``report.html``. Samples are made first
(or reused) by :func:`diffalign.eval.sample.sample`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.checkpoint import write_text_atomic
from diffalign.config import Config, ConfigError
from diffalign.data.transforms import unit_pixels
from diffalign.eval import stats
from diffalign.eval.checkpoints import resolve_all
from diffalign.eval.grid import make_grid, paginate
from diffalign.eval.report import write_report
from diffalign.eval.sample import BASE, open_rgb, read_metadata, sample, settings
from diffalign.workers import is_main_process

Scores = dict[str, list[float]]      # reward label -> one score per metadata record


def evaluate(cfg: Config) -> dict[str, Any] | None:
    """Sample (reusing images on disk), score, compare, and write results.json, grids and report.html.

    Under a multi-process launch all processes sample; the main one scores and reports, the others return None.
    """
    out = Path(cfg.output_dir)
    check_rewards(cfg.eval.rewards)                  # fail before sampling, not after
    sample(cfg)
    if not is_main_process():
        return None
    records = read_metadata(out)
    scores = score_records(records, cfg.eval.rewards, cfg.eval.batch_size, out)
    write_text_atomic(out / "scores.jsonl", "".join(
        json.dumps({**_image_key(r), **{k: v[i] for k, v in scores.items()}}) + "\n" for i, r in enumerate(records)))
    results = summarise(records, scores, cfg)
    write_text_atomic(out / "results.json", json.dumps(results, indent=2))
    grids = write_grids(records, scores, cfg, out / "grids")
    curves = training_logs(cfg)
    write_report(out / "report.html", title=f"diffalign evaluation: {cfg.name}", settings=results["settings"],
                 results=results, grids=grids, scores=by_model(records, scores), curves=curves,
                 records=records, record_scores=scores)
    return results


# ------------------------------------------------------------------------------------------------ scoring
def reward_labels(specs: Sequence[Any]) -> list[str]:
    """Column names for the rewards: the reward's name, numbered when a name repeats (two CLIP models)."""
    names = [str(s.get("name", "reward")) if isinstance(s, dict) else str(s) for s in specs]
    return [n if names.count(n) == 1 else f"{n}#{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def check_rewards(specs: Sequence[Any]) -> None:
    """Names and options of the configured rewards, checked without loading any weights."""
    from diffalign.rewards import REWARDS
    from diffalign.rewards.base import check_options

    if not specs:
        raise ConfigError("`eval.rewards` is empty: name at least one reward (e.g. [pickscore] or [brightness])")
    for i, spec in enumerate(specs):
        options = dict(spec) if isinstance(spec, dict) else {"name": spec}
        name = options.pop("name", None)
        if name not in REWARDS:
            raise ConfigError(f"`eval.rewards[{i}]`: unknown reward {name!r}; available: {', '.join(sorted(REWARDS))}")
        try:
            check_options(name, REWARDS[name], options)
        except ValueError as err:
            raise ConfigError(f"`eval.rewards[{i}]`: {err}") from None


def score_records(records: list[dict], specs: Sequence[Any], batch_size: int, out: Path) -> Scores:
    """Every image scored by every reward; one reward model is in memory at a time."""
    from diffalign.rewards import reward_from_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scores: Scores = {}
    for i, (label, spec) in enumerate(zip(reward_labels(specs), specs, strict=True)):
        try:
            reward = reward_from_config(spec)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"`eval.rewards[{i}]`: {err}") from None
        values: list[float] = []
        for start in tqdm(range(0, len(records), batch_size), desc=f"scoring {label}", unit="batch"):
            batch = records[start:start + batch_size]
            images = torch.stack([load_image(image_path(r, out)) for r in batch]).to(device)
            with torch.no_grad():
                batch_scores = reward(images, [r["prompt"] for r in batch]).cpu()
            bad = (~torch.isfinite(batch_scores)).nonzero().flatten().tolist()
            if bad:
                raise ValueError(f"reward {label} gave {batch_scores[bad[0]].item()} for "
                                 f"{image_path(batch[bad[0]], out)} ({batch[bad[0]]['checkpoint']})")
            values += batch_scores.tolist()
        scores[label] = values
        del reward
    return scores


def image_path(record: dict, out: Path) -> Path:
    path = Path(record["path"])
    return path if path.is_absolute() or path.exists() else out / path


def load_image(path: Path) -> torch.Tensor:
    """A PNG as float [3,H,W] in [0,1]."""
    with Image.open(path) as img:
        return unit_pixels(img)


# ------------------------------------------------------------------------------------------------ numbers
def summarise(records: list[dict], scores: Scores, cfg: Config) -> dict[str, Any]:
    e = cfg.eval
    boot = {"num_resamples": e.num_resamples, "confidence": e.confidence}
    groups = np.array([r["prompt_index"] for r in records])
    labels = list(dict.fromkeys(r["checkpoint"] for r in records))
    models = {label: {reward: stats.mean_ci(np.asarray(vals)[_rows(records, label)],
                                            groups[_rows(records, label)], **boot)
                      for reward, vals in scores.items()} for label in labels}
    comparisons = []
    if BASE in labels:
        for label in (x for x in labels if x != BASE):
            comparisons += [_compare(records, vals, label, reward, models, boot) for reward, vals in scores.items()]
    nested: dict[str, dict[str, dict]] = {}
    for row in comparisons:
        nested.setdefault(row["checkpoint"], {})[row["reward"]] = {k: v for k, v in row.items()
                                                                   if k not in ("checkpoint", "reward")}
    return {"settings": {**settings(cfg), "seeds": list(e.seeds), "num_prompts": len(set(groups.tolist())),
                         "rewards": list(scores), "bootstrap": "prompts resampled with replacement", **boot},
            "models": models, "checkpoints": nested, "comparisons": comparisons}


def _rows(records: list[dict], label: str) -> np.ndarray:
    return np.array([i for i, r in enumerate(records) if r["checkpoint"] == label], dtype=int)


def _compare(records: list[dict], vals: list[float], label: str, reward: str, models: dict,
             boot: dict) -> dict[str, Any]:
    """The checkpoint's images against the base's, paired by (prompt, seed)."""
    base = {(r["prompt_index"], r["seed"]): vals[i] for i, r in enumerate(records) if r["checkpoint"] == BASE}
    pairs = [(base[(r["prompt_index"], r["seed"])], vals[i], r["prompt_index"])
             for i, r in enumerate(records) if r["checkpoint"] == label and (r["prompt_index"], r["seed"]) in base]
    b, t, g = (np.array(col) for col in zip(*pairs, strict=True))
    wr, diff = stats.win_rate(b, t, g, **boot), stats.mean_ci(t - b, g, **boot)
    tuned, base_mean = models[label][reward], models[BASE][reward]
    return {"checkpoint": label, "reward": reward, "n": wr["n"], "win_rate": wr["win_rate"], "win_rate_ci": wr["ci"],
            "wins": wr["wins"], "losses": wr["losses"], "ties": wr["ties"], "mean": tuned["mean"],
            "mean_ci": tuned["ci"], "base_mean": base_mean["mean"], "base_mean_ci": base_mean["ci"],
            "mean_diff": diff["mean"], "mean_diff_ci": diff["ci"]}


def by_model(records: list[dict], scores: Scores) -> dict[str, dict[str, list[float]]]:
    """scores[reward][model] -> that model's scores, for the distribution plots."""
    return {reward: {label: [vals[i] for i in _rows(records, label)]
                     for label in dict.fromkeys(r["checkpoint"] for r in records)}
            for reward, vals in scores.items()}


# ------------------------------------------------------------------------------------------------ grids and logs
def write_grids(records: list[dict], scores: Scores, cfg: Config, folder: Path) -> list[Path]:
    """Rows = (prompt, seed), columns = base and checkpoints, the first reward's score on every image."""
    labels = list(dict.fromkeys(r["checkpoint"] for r in records))
    index = {(r["checkpoint"], r["prompt_index"], r["seed"]): i for i, r in enumerate(records)}
    keys = list(dict.fromkeys((r["prompt_index"], r["seed"], r["prompt"]) for r in records))
    first = next(iter(scores), None)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("grid_*.png"):
        old.unlink()
    paths = []
    multi_seed = len(cfg.eval.seeds) > 1
    for page, rows in enumerate(paginate(len(keys), cfg.eval.grid_rows)):
        images, captions, cell_text = [], [], []
        for p, seed, prompt in (keys[k] for k in rows):
            cells = [index.get((label, p, seed)) for label in labels]
            images.append([open_rgb(image_path(records[i], Path(cfg.output_dir))) for i in cells])
            captions.append(f"{prompt} (seed {seed})" if multi_seed else prompt)
            cell_text.append([_score_caption(first, scores, i, cfg.eval.grid_cell) for i in cells])
        grid = make_grid(images, captions, labels, cfg.eval.grid_cell, cell_text)
        path = folder / f"grid_{page:03d}.png"
        grid.save(path)
        paths.append(path)
    return paths


def _score_caption(reward: str | None, scores: Scores, i: int, cell: int) -> str:
    if reward is None:
        return ""
    return f"{reward} {scores[reward][i]:.4g}" if cell >= 160 else f"{scores[reward][i]:.4g}"


def training_logs(cfg: Config) -> dict[str, list[dict]]:
    """metrics.jsonl of this run and of each checkpoint's run folder, keyed by run name."""
    found: dict[Path, str] = {}
    candidates = [(Path(cfg.output_dir), cfg.name)]
    for ckpt in resolve_all(cfg.eval.checkpoints, cfg.output_dir):
        candidates += [(parent, parent.name) for parent in list(ckpt.path.resolve().parents)[:3]]
    for folder, name in candidates:
        log_file = (folder / "metrics.jsonl").resolve()
        if log_file.is_file() and log_file not in found:
            found[log_file] = name
    curves = {}
    for log_file, name in found.items():
        rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
        curves[name if name not in curves else str(log_file.parent)] = rows
    return curves


def _image_key(record: dict) -> dict[str, Any]:
    return {k: record[k] for k in ("checkpoint", "prompt_index", "seed", "prompt", "path")}


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A plain-text table of the comparisons for the terminal."""
    ci = f"{results['settings']['confidence']:.0%} CI"
    lines = [f"{'checkpoint':24s} {'reward':20s} {'win rate [' + ci + ']':24s} {'base mean':>10s} {'mean':>10s}"]
    for c in results["comparisons"]:
        lo, hi = c["win_rate_ci"]
        lines.append(f"{c['checkpoint'][:24]:24s} {c['reward'][:20]:20s} "
                     f"{c['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]{'':5s} {c['base_mean']:10.4g} {c['mean']:10.4g}")
    return lines
