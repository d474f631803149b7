"""``diffalign sample``: images for every (prompt, seed) from the base model and each checkpoint, plus metadata.

Layout under ``output_dir``::

    samples/<model>/p<prompt index>_s<seed>.png     one PNG per image, written atomically
    samples/<model>/settings.json                   what the images were made with (reuse check)
    metadata.jsonl                                  one line per image: model, checkpoint, prompt, seed, path, ...

Images already on disk are reused only when the settings and the checkpoint's weights file are unchanged (the
folder's images are deleted otherwise), so an interrupted run resumes and a retrained checkpoint is never scored
from stale images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.checkpoint import replacing, write_text_atomic
from diffalign.config import Config, ConfigError
from diffalign.data.prompts import read_prompts
from diffalign.eval.checkpoints import Checkpoint, applied, resolve_all
from diffalign.eval.generate import generate, make_scheduler, to_uint8
from diffalign.models.base import DiffusionModel
from diffalign.options import parse_dtype
from diffalign.workers import Workers, launched

log = logging.getLogger("diffalign")
METADATA = "metadata.jsonl"
STAMP = "settings.json"
BASE = "base"


def default_prompts() -> Path:
    return Path(str(resources.files("diffalign") / "assets" / "eval_prompts.txt"))


def eval_prompts(cfg: Config) -> list[str]:
    return read_prompts(cfg.eval.prompts if cfg.eval.prompts is not None else str(default_prompts()),
                        "eval.prompts")


def image_size(cfg: Config) -> tuple[int, int]:
    size = cfg.eval.resolution or cfg.data.resolution
    return size, size


def sampling_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return parse_dtype(name)


def settings(cfg: Config) -> dict[str, Any]:
    """Everything besides the weights that decides the images."""
    e, m = cfg.eval, cfg.model
    return {"pretrained": m.pretrained, "revision": m.revision, "variant": m.variant, "vae": m.vae,
            "vae_dtype": m.vae_dtype, "dtype": str(sampling_dtype(e.dtype)).removeprefix("torch."),
            "scheduler": e.scheduler, "num_steps": e.num_steps, "guidance_scale": e.guidance_scale, "eta": e.eta,
            "resolution": list(image_size(cfg)), "negative_prompt": e.negative_prompt}


@dataclass
class Job:
    prompt_index: int
    prompt: str
    seed: int

    @property
    def filename(self) -> str:
        """Index, a hash of the prompt text (an edited prompt file never matches old images) and seed."""
        digest = hashlib.sha1(self.prompt.encode()).hexdigest()[:8]
        return f"p{self.prompt_index:04d}_{digest}_s{self.seed}.png"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "model"


def save_png(array: Any, path: Path) -> None:
    with replacing(path) as tmp:
        Image.fromarray(array.numpy()).save(tmp, format="PNG")


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class Sampler:
    """Generates one model's images for a list of jobs, skipping the ones already on disk."""

    def __init__(self, cfg: Config, model: DiffusionModel) -> None:
        self.cfg, self.model = cfg, model
        self.scheduler = make_scheduler(model, cfg.eval.scheduler, cfg.model.revision)
        self.size = image_size(cfg)
        self.made = 0

    def images(self, jobs: list[Job]) -> torch.Tensor:
        return self.images_for([j.prompt for j in jobs], [j.seed for j in jobs])

    def images_for(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        """[B,3,H,W] in [0,1] with the evaluation's sampler settings."""
        e = self.cfg.eval
        return generate(self.model, self.scheduler, prompts, seeds, self.size, e.num_steps, e.guidance_scale,
                        e.negative_prompt, e.eta)

    def run(self, folder: Path, jobs: list[Job], ckpt: Checkpoint | None, bar: tqdm, workers: Workers) -> None:
        if workers.is_main:
            self.refresh(folder, ckpt)
        workers.barrier()                            # stale images are gone before anyone lists what is missing
        todo = [j for j in jobs if not (folder / j.filename).is_file()]
        workers.barrier()                            # ... and everyone has listed it before anyone writes
        bar.update(len(jobs) - len(todo))
        size = self.cfg.eval.batch_size
        with applied(self.model, ckpt):
            for batch, done in workers.rounds([todo[i:i + size] for i in range(0, len(todo), size)]):
                if batch:
                    for job, array in zip(batch, to_uint8(self.images(batch)), strict=True):
                        save_png(array, folder / job.filename)
                    self.made += len(batch)
                bar.update(done)

    def refresh(self, folder: Path, ckpt: Checkpoint | None) -> None:
        """Delete the folder's images unless they were made with these settings and weights; stamp it."""
        if up_to_date(self.cfg, folder, ckpt):
            return
        for old in folder.glob("p*_s*.png"):
            old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / STAMP, json.dumps(stamp_for(self.cfg, ckpt), indent=2))


def stamp_for(cfg: Config, ckpt: Checkpoint | None) -> dict[str, Any]:
    return {"settings": settings(cfg), "checkpoint": ckpt.fingerprint() if ckpt else None}


def up_to_date(cfg: Config, folder: Path, ckpt: Checkpoint | None) -> bool:
    """The folder's images were made with these settings and these weights."""
    try:
        return json.loads((folder / STAMP).read_text()) == stamp_for(cfg, ckpt)
    except (OSError, ValueError):          # missing or damaged: treat as made with other settings
        return False


def complete(cfg: Config, folder: Path, ckpt: Checkpoint | None, jobs: list[Job]) -> bool:
    return up_to_date(cfg, folder, ckpt) and all((folder / j.filename).is_file() for j in jobs)


def jobs_for(cfg: Config) -> list[Job]:
    return [Job(i, prompt, seed) for i, prompt in enumerate(eval_prompts(cfg)) for seed in cfg.eval.seeds]


def sample(cfg: Config) -> Path:
    """Sample the base model and every checkpoint; returns the path of metadata.jsonl.

    Under ``torchrun`` / ``accelerate launch`` the batches are shared among the processes (one GPU each).
    """
    from diffalign.models import load_model

    out = Path(cfg.output_dir)
    jobs = jobs_for(cfg)
    checkpoints = resolve_all(cfg.eval.checkpoints, out)
    models: list[tuple[str, Checkpoint | None]] = [(BASE, None)] if cfg.eval.base else []
    models += [(c.label, c) for c in checkpoints]
    if not models:
        raise ConfigError(f"nothing to sample: eval.base is false and no checkpoint was found (eval.checkpoints "
                          f"is empty and {out / 'final'} does not exist)")
    folders = sample_folders(out, [label for label, _ in models])
    records = [_record(cfg, label, ckpt, job, folders[label] / job.filename) for label, ckpt in models for job in jobs]
    pending = [(label, ckpt) for label, ckpt in models if not complete(cfg, folders[label], ckpt, jobs)]
    with launched() as workers:
        if pending:                  # otherwise every image is on disk already: no model to load
            model = load_model(cfg.model, workers.device, sampling_dtype(cfg.eval.dtype))
            sampler = Sampler(cfg, model)
            with tqdm(total=len(pending) * len(jobs), desc="sampling", unit="img",
                      disable=not workers.is_main) as bar:
                for label, ckpt in pending:
                    bar.set_postfix_str(label)
                    sampler.run(folders[label], jobs, ckpt, bar, workers)
            if workers.world > 1:
                log.info("process %d of %d made %d images", workers.rank, workers.world, sampler.made)
        else:
            log.info("all %d images are on disk with these settings and weights; nothing to sample", len(records))
        workers.barrier()
        if workers.is_main:
            write_metadata(out, records)
        workers.barrier()
    return out / METADATA


def sample_folders(out: Path, labels: list[str]) -> dict[str, Path]:
    """One folder per model; labels that would share a folder (`lr 1e-4` and `lr_1e-4`) are refused."""
    folders = {label: out / "samples" / slug(label) for label in labels}
    seen: dict[str, str] = {}
    for label, folder in folders.items():
        other = seen.setdefault(folder.name.lower(), label)
        if other != label:
            raise ConfigError(f"`eval.checkpoints`: labels {other!r} and {label!r} would share the folder "
                              f"{folder}; give one of them another {{name: ..., path: ...}}")
    return folders


def _record(cfg: Config, label: str, ckpt: Checkpoint | None, job: Job, path: Path) -> dict[str, Any]:
    return {"checkpoint": label, "checkpoint_path": str(ckpt.path) if ckpt else None, "prompt": job.prompt,
            "prompt_index": job.prompt_index, "seed": job.seed, "path": str(path), **settings(cfg)}


def write_metadata(out: Path, records: list[dict]) -> Path:
    return write_text_atomic(out / METADATA, "".join(json.dumps(r) + "\n" for r in records))


def read_metadata(out: Path) -> list[dict]:
    path = out / METADATA
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows
