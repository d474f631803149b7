"""Run folders: what a fresh run may start in, and what a resume may change.

A fresh run refuses an ``output_dir`` that already holds another run's checkpoints, final weights or metrics
(``train.overwrite=true`` deletes them first), so two runs never mix. A resume compares the configuration with
the one saved in the checkpoint, key by key, and sorts every difference into one of three kinds:

* refused: the checkpoint cannot mean the same thing under the new value (model, method, LoRA shape, optimizer,
  the batch layout: batch size, accumulation, number of processes);
* applied: optimizer and schedule settings, put into effect on purpose (the learning-rate schedule is rebuilt
  at the resumed step) and logged;
* warned: everything else that shapes training (data, method hyper-parameters, seed, precision).

Settings that do not touch the training path (logging, checkpoint cadence, evaluation, workers) pass silently.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from diffalign import checkpoint as ckpt
from diffalign.config import ConfigError

log = logging.getLogger("diffalign")

METRICS = "metrics.jsonl"
RUN_ENTRIES = ("final", METRICS)            # besides checkpoint-* (and their temporary siblings)
OVERWRITTEN = ("eval",)                      # also deleted by train.overwrite (stale progress samples are refused
                                             # by the monitor itself, so they alone do not make a folder a run)

REFUSED = ("model.pretrained", "model.vae", "model.variant", "model.revision", "method.name", "lora.enabled",
           "lora.rank", "lora.alpha", "lora.target_modules", "train.batch_size", "train.grad_accum",
           "train.optimizer", "num_processes", "sharded", "engine")
APPLIED = ("train.lr", "train.max_steps", "train.lr_scheduler", "train.warmup_steps", "train.weight_decay",
           "train.adam_betas", "train.adam_eps", "train.max_grad_norm")
SCHEDULE = ("train.lr", "train.max_steps", "train.lr_scheduler", "train.warmup_steps")
SILENT = ("name", "output_dir", "train.resume", "train.overwrite", "train.checkpoint_every", "train.keep_last",
          "train.log_every", "train.report_to", "train.gradient_checkpointing", "train.channels_last", "train.compile",
          "train.compile_options", "train.process_timeout_s",
          "data.num_workers", "data.reference_epochs", "lora.init",
          "lora.init_from",
          "eval.")


class RunFolderError(ConfigError):
    """The output folder holds another run, or a resume would change what the checkpoint means."""


# ------------------------------------------------------------------------------------------- fresh runs


def run_entries(out: Path) -> list[str]:
    """Names in ``out`` that belong to a run: checkpoints (complete or not), final/, metrics."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir()
                  if p.name in RUN_ENTRIES or ckpt.CHECKPOINT_RE.match(p.name.removeprefix(".tmp-")))


def check_output_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir={out} is a file, not a folder; choose another output_dir")


def prepare_fresh(out: Path, overwrite: bool) -> None:
    """Make sure a run starting at step 0 does not mix with another run's files in ``out``."""
    check_output_dir(out)
    found = run_entries(out)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:6]) + (", ..." if len(found) > 6 else "")
        raise RunFolderError(
            f"output_dir={out} already holds a run ({shown}). To continue it, add train.resume=latest; to start "
            f"afresh, choose another output_dir (or name), or add train.overwrite=true to delete those files first.")
    for name in found + [n for n in OVERWRITTEN if (out / n).exists()]:
        path = out / name
        if path.is_dir():
            ckpt.remove_tree(path)
        else:
            path.unlink()
    log.warning("train.overwrite=true: deleted the earlier run's %s from %s", ", ".join(found), out)


def truncate_metrics(out: Path, step: int) -> None:
    """Drop the metrics logged after ``step`` (they are about to be redone), keeping every earlier line."""
    path = out / METRICS
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if _logged_step(line) <= step]
    if len(kept) != len(lines):
        ckpt.write_text_atomic(path, "".join(kept))
        log.info("%s: dropped %d line(s) logged after step %d", path, len(lines) - len(kept), step)


def _logged_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", float("inf")))
    except (ValueError, AttributeError):
        return float("inf")        # an unreadable (half-written) line goes too


# ------------------------------------------------------------------------------------------- resumes


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def _matches(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def config_changes(saved: dict, current: dict) -> dict[str, list[str]]:
    """{"refused" | "applied" | "warned": ["key: checkpoint has A, config has B", ...]} between two configs
    (``to_dict`` trees, plus top-level ``num_processes``, ``sharded`` and ``engine``)."""
    a, b = flatten(saved), flatten(current)
    out: dict[str, list[str]] = {"refused": [], "applied": [], "warned": []}
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b or a[key] == b[key] or _matches(key, SILENT):
            continue          # keys added in a later version are not differences
        kind = "refused" if _matches(key, REFUSED) else "applied" if _matches(key, APPLIED) else "warned"
        out[kind].append(f"{key}: checkpoint has {a[key]!r}, config has {b[key]!r}")
    return out


def check_resume(path: Path, saved: dict, current: dict) -> list[str]:
    """Refuse, warn about or report the changes; returns the applied ones (the trainer puts them into effect)."""
    changes = config_changes(saved, current)
    if changes["refused"]:
        raise RunFolderError(
            f"cannot resume from {path}: these settings differ from the checkpoint's and would change what it "
            "means:\n  " + "\n  ".join(changes["refused"])
            + "\nrestore them, or start a new run (another output_dir, or train.overwrite=true).")
    if changes["warned"]:
        log.warning("resuming from %s with settings that differ from the checkpoint's (the run will not match an "
                    "uninterrupted one):\n  %s", path, "\n  ".join(changes["warned"]))
    if changes["applied"]:
        log.warning("resuming from %s: applying the new settings from this step on:\n  %s", path,
                    "\n  ".join(changes["applied"]))
    return changes["applied"]


def remove_leftovers(out: Path) -> None:
    """Temporary folders a killed run left behind (``.tmp-*``, ``.old-*``, ``.del-*``)."""
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-checkpoint-", ".old-", ".del-")):
                shutil.rmtree(p, ignore_errors=True)
