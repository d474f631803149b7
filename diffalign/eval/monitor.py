"""In-training evaluation: the same prompts and seed sampled every ``eval.every`` steps, laid out as a grid.

Each evaluation writes ``output_dir/eval/step-<N>/<i>.png`` and redraws ``output_dir/eval/progress.png``: rows are
the prompts, columns the evaluated steps (the first one and the latest ``MAX_COLUMNS - 1``), so the model's
drift is visible at a glance. Sampling uses its own seeded generators and leaves the training RNG untouched.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from diffalign.config import Config
from diffalign.eval.generate import generate, make_scheduler, to_uint8
from diffalign.eval.grid import make_grid
from diffalign.eval.sample import eval_prompts, image_size, open_rgb, save_png
from diffalign.models.base import DiffusionModel

MAX_COLUMNS = 8
STEP_RE = re.compile(r"^step-(\d+)$")


class ProgressGrid:
    def __init__(self, cfg: Config, model: DiffusionModel) -> None:
        e = cfg.eval
        self.cfg, self.model = cfg, model
        self.prompts = eval_prompts(cfg)[: e.every_prompts]
        self.seed = e.seeds[0]
        self.scheduler = make_scheduler(model, e.scheduler)
        self.folder = Path(cfg.output_dir) / "eval"

    def __call__(self, step: int) -> Image.Image:
        """Sample the current model (the caller sets eval mode, precision and the unwrapped UNet)."""
        e = self.cfg.eval
        images = generate(self.model, self.scheduler, self.prompts, [self.seed] * len(self.prompts),
                          image_size(self.cfg), e.num_steps, e.guidance_scale, e.negative_prompt, e.eta)
        step_dir = self.folder / f"step-{step:06d}"
        step_dir.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(to_uint8(images)):
            save_png(array, step_dir / f"{i}.png")
        grid = self.progress()
        tmp = self.folder / ".tmp-progress.png"
        grid.save(tmp, format="PNG")
        tmp.replace(self.folder / "progress.png")
        return grid

    def progress(self) -> Image.Image:
        n = len(self.prompts)
        steps = sorted(int(m.group(1)) for p in self.folder.iterdir()
                       if (m := STEP_RE.match(p.name)) and all((p / f"{i}.png").is_file() for i in range(n)))
        shown = steps if len(steps) <= MAX_COLUMNS else [steps[0], *steps[-(MAX_COLUMNS - 1):]]
        rows = [[open_rgb(self.folder / f"step-{s:06d}" / f"{i}.png") for s in shown]
                for i in range(n)]
        return make_grid(rows, self.prompts, [f"step {s}" for s in shown], self.cfg.eval.grid_cell)
