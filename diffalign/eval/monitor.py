"""In-training evaluation: the same prompts and seed sampled every ``eval.every`` steps, laid out as a grid.

Each evaluation writes ``output_dir/eval/step-<N>/<i>.png`` (with the prompts and settings it used) and redraws
``output_dir/eval/progress.png``: rows are the prompts, columns the evaluated steps up to the current one that used
the same prompts and settings (the first and the latest ``MAX_COLUMNS - 1``), so the model's drift is visible at
a glance. Prompts go through in batches of ``eval.batch_size``. Sampling uses its own seeded generators and
leaves the training RNG untouched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from PIL import Image

from diffalign.checkpoint import replacing, write_text_atomic
from diffalign.config import Config
from diffalign.eval.generate import to_uint8
from diffalign.eval.grid import make_grid
from diffalign.eval.sample import STAMP, Job, Sampler, eval_prompts, open_rgb, save_png, settings
from diffalign.models.base import DiffusionModel

MAX_COLUMNS = 8
STEP_RE = re.compile(r"^step-(\d+)$")


class ProgressGrid:
    def __init__(self, cfg: Config, model: DiffusionModel, write: bool = True) -> None:
        e = cfg.eval
        self.cfg, self.write = cfg, write
        self.prompts = eval_prompts(cfg)[: e.every_prompts]
        self.seed = e.seeds[0]
        self.sampler = Sampler(cfg, model)
        self.folder = Path(cfg.output_dir) / "eval"
        self.stamp = {"prompts": self.prompts, "seed": self.seed, "settings": settings(cfg)}

    def __call__(self, step: int) -> Image.Image | None:
        """Sample the current model (the caller sets eval mode, precision and the unwrapped UNet). Without
        ``write`` (a process of a sharded run beside the main one) only sample, in step with it: None."""
        step_dir = self.folder / f"step-{step:06d}"
        jobs = [Job(i, prompt, self.seed) for i, prompt in enumerate(self.prompts)]
        size = self.cfg.eval.batch_size
        if not self.write:
            for start in range(0, len(jobs), size):
                self.sampler.images(jobs[start:start + size])
            return None
        step_dir.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(jobs), size):
            for i, array in enumerate(to_uint8(self.sampler.images(jobs[start:start + size])), start):
                save_png(array, step_dir / f"{i}.png")
        write_text_atomic(step_dir / STAMP, json.dumps(self.stamp))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()             # hand the sampling memory back to training
        grid = self.progress(step)
        with replacing(self.folder / "progress.png") as tmp:
            grid.save(tmp, format="PNG")
        return grid

    def progress(self, step: int) -> Image.Image:
        """Columns: earlier evaluations of this run with the same prompts and settings, up to `step`."""
        steps = sorted(int(m.group(1)) for p in self.folder.iterdir()
                       if (m := STEP_RE.match(p.name)) and int(m.group(1)) <= step and self._matches(p))
        shown = steps if len(steps) <= MAX_COLUMNS else [steps[0], *steps[-(MAX_COLUMNS - 1):]]
        rows = [[open_rgb(self.folder / f"step-{s:06d}" / f"{i}.png") for s in shown]
                for i in range(len(self.prompts))]
        return make_grid(rows, self.prompts, [f"step {s}" for s in shown], self.cfg.eval.grid_cell)

    def _matches(self, step_dir: Path) -> bool:
        try:
            return json.loads((step_dir / STAMP).read_text()) == self.stamp
        except (OSError, ValueError):
            return False
