"""Speed of diffalign's AlignProp against trl 0.23.1's AlignPropTrainer on the same tiny SD 1.5 pipeline (CPU).

Each side runs in its own fresh process (OMP_NUM_THREADS = --threads); the table gives seconds per optimizer step
after warm-up (one step = sample 8 prompts with DDIM, gradient through the last --grad-steps steps and the VAE
decoder, a differentiable reward, backward, clip, AdamW), CPU seconds per step, whole-process wall time and peak
RSS, and the ratio diffalign / trl (< 1: diffalign is faster). Rounds alternate which side runs first.

Matched settings: `diffalign tiny sd15` folder, 64 px, fp32; 8 prompts, one image each; 10 DDIM steps, eta 0,
classifier-free guidance 5.0; fixed truncation, the last step with gradient (trl: truncated_backprop_rand=False,
truncated_backprop_timestep=9; diffalign: method.grad_steps=1, truncation=fixed); reward: mean brightness;
LoRA rank 4, alpha 4, gaussian init on to_q/to_k/to_v/to_out.0 (trl's fixed choice); AdamW lr 1e-4, weight decay
1e-2, grad-norm clip 1.0. Both checkpoint the UNet call that carries gradient. Remaining differences: trl's
loss is 10 - mean(r), ours -0.01 * mean(r) (the official loss_coeff): the same work.

    .venv/bin/diffalign tiny sd15 /work/bench-ddpo/sd15
    .venv/bin/python scripts/bench_alignprop_trl.py --pretrained /work/bench-ddpo/sd15 --steps 10 --rounds 2
The trl venv: see scripts/bench_grpo_trl.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddpo_trl_child import PROMPTS, child_env, run_child  # noqa: E402  (shared with bench_grpo_trl.py; no trl import)


def run_diffalign(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from diffalign.config import load_config
    from diffalign.trainer import Trainer

    imported = time.perf_counter()
    cfg = load_config(None, [
        f"model.pretrained={args.pretrained}", f"output_dir={args.root}/run-alignprop", "train.overwrite=true",
        f"data.prompts={json.dumps(PROMPTS)}", "data.resolution=64", "data.num_workers=0", "lora.rank=4",
        "lora.init=gaussian", f"train.batch_size={len(PROMPTS)}", f"train.max_steps={args.warmup + args.steps}",
        f"train.lr={args.lr}", "train.lr_scheduler=constant", "train.weight_decay=1e-2", "train.max_grad_norm=1.0",
        "train.mixed_precision=no", "train.checkpoint_every=0", "train.report_to=none", f"train.seed={args.seed}",
        "method.name=alignprop", "method.reward=brightness", f"method.num_steps={args.num_steps}",
        f"method.grad_steps={args.grad_steps}", "method.truncation=fixed", f"method.guidance_scale={args.guidance}",
        "method.eta=0.0"])
    trainer = Trainer(cfg)
    batches = trainer.batches()
    loaded = time.perf_counter()
    times, cpu_times = [], []
    load_before = os.getloadavg()[0]
    for _ in range(args.warmup + args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train_step(batches)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    timed = times[args.warmup:]
    return {"side": "diffalign", "prompts_per_step": len(PROMPTS), "step_s": sum(timed) / len(timed),
            "cpu_step_s": sum(cpu_times[args.warmup:]) / len(timed), "first_step_s": times[0],
            "load": [load_before, os.getloadavg()[0]], "import_s": imported - PROCESS_START,
            "setup_s": loaded - imported, "trainable_params": sum(p.numel() for p in trainer.params),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def child(side: str, args: argparse.Namespace) -> tuple[dict, float]:
    env = child_env(args.threads)
    if side == "trl":
        cmd = [args.trl_python, str(HERE / "_alignprop_trl_child.py"), "--pretrained", args.pretrained,
               "--prompts", json.dumps(PROMPTS), "--num-steps", str(args.num_steps), "--grad-steps",
               str(args.grad_steps), "--guidance", str(args.guidance), "--lr", str(args.lr), "--epochs",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--seed", str(args.seed)]
    else:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", "diffalign"]
    return run_child(cmd, env, side)


ROWS = (("s/step (timed, mean)", lambda r, w: r["step_s"]), ("CPU s/step", lambda r, w: r["cpu_step_s"]),
        ("first (warm-up) step s", lambda r, w: r["first_step_s"]), ("import s", lambda r, w: r["import_s"]),
        ("setup s", lambda r, w: r["setup_s"]), ("whole process wall s", lambda r, w: w),
        ("peak RSS MiB", lambda r, w: r["peak_rss_mib"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="/work/bench-ddpo/sd15")
    parser.add_argument("--trl-python", default="/work/trl-venv/bin/python")
    parser.add_argument("--root", default="/work/bench-ddpo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=10)
    parser.add_argument("--grad-steps", type=int, default=1)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side == "diffalign":
        print("RESULT " + json.dumps(run_diffalign(args)), flush=True)
        return
    if not Path(args.pretrained, "model_index.json").is_file():
        sys.exit(f"{args.pretrained}: no pipeline; run `.venv/bin/diffalign tiny sd15 {args.pretrained}` first")
    rounds = []
    for k in range(args.rounds):
        order = ["diffalign", "trl"] if k % 2 == 0 else ["trl", "diffalign"]
        runs = dict((side, child(side, args)) for side in order)
        rounds.append(runs)
        ours, theirs = runs["diffalign"], runs["trl"]
        print(f"\n=== round {k + 1} of {args.rounds} (first: {order[0]}); tiny SD 1.5, 64 px, fp32, {len(PROMPTS)} "
              f"prompts/step, {args.num_steps} DDIM steps (eta 0, guidance {args.guidance}), last {args.grad_steps} "
              f"with gradient; trl {theirs[0]['versions']['trl']}, torch {theirs[0]['versions']['torch']}")
        print(f"{'':26s}{'diffalign':>14s}{'trl':>14s}{'diffalign/trl':>15s}")
        for label, get in ROWS:
            print(f"{label:26s}{get(*ours):14.3f}{get(*theirs):14.3f}{get(*ours) / get(*theirs):15.2f}")
        print(f"trainable params: diffalign {ours[0]['trainable_params']}, trl {theirs[0]['trainable_params']}; "
              f"load average at start/end: diffalign {ours[0]['load']}, trl {theirs[0]['load']}")
    if args.rounds > 1:
        print(f"\n=== median over {args.rounds} rounds")
        for label, get in ROWS[:2] + ROWS[5:6]:
            ratios = [get(*r["diffalign"]) / get(*r["trl"]) for r in rounds]
            print(f"{label:26s} diffalign/trl {statistics.median(ratios):.2f} (" +
                  " ".join(f"{x:.2f}" for x in ratios) + ")")


if __name__ == "__main__":
    main()
