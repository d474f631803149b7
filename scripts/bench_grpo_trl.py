"""Speed of diffalign's GRPO against trl 0.23.1's DDPOTrainer on the same tiny SD 1.5 pipeline (CPU).

What it measures, for each side in its own fresh process (2 torch threads, OMP_NUM_THREADS=2):
  * seconds per training step after warm-up, where one step = sample a rollout batch, score it, one optimizer
    step on it (diffalign: Trainer.train_step; trl: DDPOTrainer.step = one DDPO epoch), and its steps/s;
  * the same step split into sample / reward / update (wrappers around each side's own functions);
  * whole-process wall time (interpreter start, imports, pipeline load, warm-up and timed steps), measured by
    this script around the child process.
and prints one table with the ratio diffalign / trl (time ratios: < 1 means diffalign is faster).

Matched settings (defaults; flags change them on both sides at once):
  pipeline      `diffalign tiny sd15` folder (random weights, UNet 32/64 channels), 64 px (8x8 latents), fp32
  prompts       8 toy colour prompts x group 4 = 32 images per step, in ONE sampling batch on both sides
                (trl: sample_batch_size=32, sample_num_batches_per_epoch=1; diffalign: train.batch_size=8,
                method.group_size=4)
  sampler       DDIM, 10 steps, eta 1.0, classifier-free guidance 5.0 (one UNet call on [uncond; cond] = 64)
  update        every one of the 10 steps trained (timestep_fraction 1.0), guidance in the update too
                (trl train_cfg=True), clip range 1e-4, advantage clip 5, ONE optimizer step per rollout
                (trl: train_batch_size=32, train_gradient_accumulation_steps=1, num_inner_epochs=1, which
                accumulates over the 10 timesteps)
  LoRA          rank 4, alpha 4, gaussian init, to_q/to_k/to_v/to_out.0 (trl's fixed choice; 9,984 params)
  optimizer     AdamW lr 1e-4, weight decay 1e-2, eps 1e-8, grad-norm clip 1.0
  reward        minus JPEG size in kB at quality 95 (diffalign.rewards jpeg_compressibility; the trl child
                reimplements it as a plain function with the same arithmetic)
Known differences that remain (they are the libraries' designs, not settings):
  * both sides backpropagate each trained step's loss before computing the next (diffalign's GRPO yields one
    loss term per step, the trainer backpropagates each), so both run 20 UNet forward-equivalents and 10
    backwards per update. (An earlier GRPO checkpointed each step's call and backpropagated once: 10 extra
    forwards, 1.5x trl's step time in this benchmark.)
  * advantages: diffalign normalises within each prompt's group of 4, DDPO (per_prompt_stat_tracking=False)
    over the whole batch; trl shuffles timesteps per sample; diffalign's timesteps come from its own schedule
    code. None of these changes the amount of work.

Run (main venv; the trl venv is a separate one, see --trl-python):
    .venv/bin/diffalign tiny sd15 /work/bench-ddpo/sd15
    .venv/bin/python scripts/bench_grpo_trl.py --pretrained /work/bench-ddpo/sd15 --steps 20 --warmup 2 --rounds 2
    .venv/bin/python scripts/bench_grpo_trl.py --profile --steps 3 --rounds 1   # + torch.profiler, one step
    --diffalign-src /path/to/export measures another copy of the package (e.g. `git archive HEAD diffalign`)
  On a shared machine the load varies: the table prints the 1-minute load average at both ends of each side;
  CPU s/step (process time) is less sensitive to it than wall time.
The trl venv: python3 -m venv /work/trl-venv && /work/trl-venv/bin/pip install trl==0.23.1 diffusers==0.42.1
peft==0.21.2 torch==2.14.1 transformers==5.24.0 accelerate==1.15.0 (the main venv's versions).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _ddpo_trl_child import PROMPTS, PhaseTimer, child_env, run_child  # noqa: E402  (the same phase timer on both sides; no trl import at top)


def run_diffalign(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import diffalign.methods.grpo as grpo
    from diffalign.config import load_config
    from diffalign.trainer import Trainer

    imported = time.perf_counter()
    overrides = [
        f"model.pretrained={args.pretrained}", f"output_dir={args.root}/run-diffalign-{args.variant}",
        f"data.prompts={json.dumps(PROMPTS)}", f"data.resolution={args.resolution}", "data.num_workers=0",
        f"lora.rank={args.rank}", "lora.init=gaussian", f"train.batch_size={len(PROMPTS)}", "train.grad_accum=1",
        f"train.max_steps={args.warmup + args.steps}", f"train.lr={args.lr}", "train.lr_scheduler=constant",
        "train.weight_decay=1e-2", "train.max_grad_norm=1.0", "train.mixed_precision=no",
        "train.checkpoint_every=0", "train.report_to=none", f"train.seed={args.seed}",
        "method.name=grpo", "method.reward=jpeg_compressibility", f"method.group_size={args.group}",
        f"method.num_steps={args.num_steps}", f"method.guidance_scale={args.guidance}", f"method.eta={args.eta}",
        "method.timestep_fraction=1.0", "method.clip_range=1e-4", "method.adv_clip_max=5.0", "method.kl_beta=0",
    ]
    cfg = load_config(None, overrides)
    trainer = Trainer(cfg)
    batches = trainer.batches()
    loaded = time.perf_counter()

    timer = PhaseTimer()
    method, model = trainer.method, trainer.model
    # Wrap what both the committed and the in-progress grpo.py call: the module's rollout(), the model's
    # prompt encoders and VAE decode, the reward's score(), accelerate's backward and the optimizer step.
    grpo.rollout = timer.wrap("rollout", grpo.rollout)                  # the 10 guided UNet calls, no grad
    for name in ("sampling_cond", "null_cond"):
        setattr(model, name, timer.wrap("text", getattr(model, name)))
    model.decode_latents = timer.wrap("decode", model.decode_latents)
    reward = method.reward_fn
    reward.score = timer.wrap("reward", reward.score)
    trainer.acc.backward = timer.wrap("backward", trainer.acc.backward)
    trainer.optimizer.step = timer.wrap("optimizer", trainer.optimizer.step)

    step_times, cpu_times, before = [], [], {}
    load_before = os.getloadavg()[0]
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            before = dict(timer.totals)
        start, cpu = time.perf_counter(), time.process_time()
        trainer.train_step(batches)
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    timed = step_times[args.warmup:]
    per = {k: (v - before.get(k, 0.0)) / len(timed) for k in ("rollout", "text", "decode", "reward", "backward",
                                                              "optimizer") for v in [timer.totals.get(k, 0.0)]}
    step_s = sum(timed) / len(timed)
    sample = per["rollout"] + per["text"] + per["decode"]
    update = step_s - sample - per["reward"]
    result = {
        "side": f"diffalign{'' if args.variant == 'default' else ' (' + args.variant + ')'}",
        "images_per_step": len(PROMPTS) * args.group, "timed_steps": len(timed), "step_s": step_s,
        "steps_per_s": 1 / step_s, "epoch_times": step_times,
        "cpu_step_s": sum(cpu_times[args.warmup:]) / len(timed), "load": [load_before, os.getloadavg()[0]],
        "phase_s": {"sample (incl. text encode, VAE decode)": sample, "reward": per["reward"], "update": update},
        "sample_detail_s": {"text encode": per["text"], "rollout (UNet)": per["rollout"], "VAE decode": per["decode"]},
        "update_detail_s": {"loss forward": update - per["backward"] - per["optimizer"],
                            "backward": per["backward"], "optimizer.step": per["optimizer"]},
        "trainable_params": sum(p.numel() for p in trainer.params),
        "import_s": imported - PROCESS_START, "setup_s": loaded - imported,
        "in_process_s": time.perf_counter() - PROCESS_START, "threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "timesteps": [s[0] for s in model.sampling_steps(args.num_steps, (1, 4, 8, 8))],
        "source": source_info(),
    }
    if args.profile:
        result["profile"] = profile_step(trainer, batches)
    return result


def profile_step(trainer, batches) -> str:
    """torch.profiler table of one more diffalign step (CPU), top operators by total CPU time; the ranges named
    ``##`` are the phases (the timing wrappers stay in place underneath)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import diffalign.methods.grpo as grpo

    model, reward = trainer.model, trainer.method.reward_fn

    def ranged(name, fn):
        def call(*a, **k):
            with record_function(name):
                return fn(*a, **k)
        return call

    grpo.rollout = ranged("## rollout (10 UNet calls, no grad)", grpo.rollout)
    model.decode_latents = ranged("## VAE decode", model.decode_latents)
    reward.score = ranged("## reward", reward.score)
    trainer.acc.backward = ranged("## backward", trainer.acc.backward)
    trainer.optimizer.step = ranged("## optimizer.step", trainer.optimizer.step)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("## train_step"):
            trainer.train_step(batches)
    return prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=44)


def source_info() -> dict:
    """Which diffalign was measured: its folder, commit, and whether grpo.py / trainer.py had local edits."""
    import diffalign

    root = Path(diffalign.__file__).resolve().parent.parent
    info = {"path": str(root)}
    try:
        git = ["git", "-C", str(root)]
        info["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "diffalign"], capture_output=True, text=True,
                               check=True).stdout.split("\n")
        info["modified"] = [line[3:] for line in dirty if line.strip()]
    except (subprocess.CalledProcessError, FileNotFoundError):
        info["commit"] = "not a git checkout"
    return info


def child(side: str, args: argparse.Namespace, variant: str = "default") -> tuple[dict, float]:
    env = child_env(args.threads)
    if side != "trl" and args.diffalign_src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.diffalign_src, env.get("PYTHONPATH")]))
    if side == "trl":
        cmd = [args.trl_python, str(HERE / "_ddpo_trl_child.py"), "--pretrained", args.pretrained,
               "--prompts", json.dumps(PROMPTS), "--group", str(args.group), "--num-steps", str(args.num_steps),
               "--guidance", str(args.guidance), "--eta", str(args.eta), "--lr", str(args.lr),
               "--weight-decay", "1e-2", "--epochs", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--seed", str(args.seed)]
    else:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--side", "diffalign", "--variant", variant]
    return run_child(cmd, env, f"{side} ({variant})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="/work/bench-ddpo/sd15", help="diffusers SD 1.5 pipeline folder")
    parser.add_argument("--trl-python", default="/work/trl-venv/bin/python", help="interpreter with trl==0.23.1")
    parser.add_argument("--root", default="/work/bench-ddpo", help="scratch folder (diffalign's output_dir parent)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (DDPO epochs) per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--group", type=int, default=4, help="images per prompt (8 prompts)")
    parser.add_argument("--num-steps", type=int, default=10, help="sampler steps (all trained)")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--resolution", type=int, default=64, help="trl uses unet.sample_size * 8 = 64 on the "
                                                                   "tiny pipeline; keep 64")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (trl's is fixed at 4)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="diffalign,trl", help="which side runs first (flipped every round)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of both sides")
    parser.add_argument("--diffalign-src", default="", help="measure the diffalign package in this folder (e.g. a "
                                                            "`git archive HEAD` export) instead of the installed one")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one diffalign step")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.side == "diffalign":
        print("RESULT " + json.dumps(run_diffalign(args)), flush=True)
        return
    if not Path(args.pretrained, "model_index.json").is_file():
        sys.exit(f"{args.pretrained}: no pipeline; run `.venv/bin/diffalign tiny sd15 {args.pretrained}` first")

    all_runs = []
    for k in range(args.rounds):                 # interleaved, the order flipped every round: drifting load
        order = args.order.split(",")            # from other processes then hits both sides alike
        runs = [child(side, args) for side in (order if k % 2 == 0 else order[::-1])]
        runs.sort(key=lambda rw: (rw[0]["side"] != "diffalign", rw[0]["side"] == "trl"))
        all_runs.append(runs)
        print_table(args, runs, f"round {k + 1} of {args.rounds} (order: {', '.join(r['side'] for r, _ in runs)})")
    if args.rounds > 1:
        print_summary(all_runs)


def print_table(args: argparse.Namespace, runs: list, title: str) -> None:
    results = {r["side"]: (r, wall) for r, wall in runs}
    ours, theirs = results["diffalign"], results["trl"]
    print(f"\n=== {title}")
    print(f"tiny SD 1.5 ({args.pretrained}), {args.resolution} px, fp32, {len(PROMPTS)} prompts x {args.group} = "
          f"{len(PROMPTS) * args.group} images/step, {args.num_steps} DDIM steps (eta {args.eta}, guidance "
          f"{args.guidance}), all trained, 1 optimizer step/rollout, LoRA r{args.rank}, {args.threads} threads; "
          f"{args.steps} timed steps after {args.warmup} warm-up; trl {theirs[0]['versions']['trl']}, "
          f"diffusers {theirs[0]['versions']['diffusers']}, torch {theirs[0]['versions']['torch']}")
    names = ["sample (incl. text encode, VAE decode)", "reward", "update"]
    header = f"{'':34s}" + "".join(f"{r['side']:>20s}" for r, _ in runs) + f"{'diffalign/trl':>15s}"
    print(header)

    def row(label: str, get, fmt: str = "{:20.3f}") -> None:
        values = [get(r, wall) for r, wall in runs]
        ratio = get(*ours) / get(*theirs)
        print(f"{label:34s}" + "".join(fmt.format(v) for v in values) + f"{ratio:15.2f}")

    row("s/step (timed, mean)", lambda r, w: r["step_s"])
    row("steps/s", lambda r, w: r["steps_per_s"])
    row("images/s", lambda r, w: r["steps_per_s"] * r["images_per_step"], "{:20.2f}")
    for name in names:
        row(f"  {name.split(' (')[0]} s/step", lambda r, w, n=name: r["phase_s"][n])
    row("CPU s/step (process time)", lambda r, w: r["cpu_step_s"])
    row("first (warm-up) step s", lambda r, w: r["epoch_times"][0])
    row("import s (in child)", lambda r, w: r["import_s"])
    row("setup s (load, LoRA, optimizer)", lambda r, w: r["setup_s"])
    row("whole process wall s", lambda r, w: w, "{:20.2f}")
    row("peak RSS MiB", lambda r, w: r["peak_rss_mib"], "{:20.0f}")
    print("load average (1 min) at start/end: " + ", ".join(f"{r['side']} {r['load'][0]:.1f}/{r['load'][1]:.1f}"
                                                         for r, _ in runs))
    print("trainable params: " + ", ".join(f"{r['side']} {r['trainable_params']}" for r, _ in runs)
          + f"; trl optimizer steps {theirs[0]['optimizer_steps']} in {theirs[0]['epochs']} epochs")
    print("timesteps: diffalign " + str([round(t) for t in ours[0]["timesteps"]]) + ", trl "
          + str(theirs[0]["timesteps"]))
    for r, _ in runs:
        for part in ("sample_detail_s", "update_detail_s"):
            print(f"{r['side']} {part[:-9]} split: " + ", ".join(f"{k} {v:.3f} s" for k, v in r[part].items()))
    src = ours[0]["source"]
    print(f"diffalign measured from {src['path']} at {src.get('commit')}, locally modified: "
          f"{', '.join(src.get('modified', [])) or 'nothing'}")
    if "profile" in ours[0]:
        print("\ntorch.profiler, one diffalign step (CPU time):\n" + ours[0]["profile"])


def print_summary(all_runs: list) -> None:
    import statistics

    print(f"\n=== median over {len(all_runs)} rounds")
    sides = [r["side"] for r, _ in all_runs[0]]
    print(f"{'':26s}" + "".join(f"{s:>20s}" for s in sides) + f"{'diffalign/trl':>15s}" + "   per-round ratios")
    for label, get in (("s/step", lambda r, w: r["step_s"]), ("CPU s/step", lambda r, w: r["cpu_step_s"]),
                       ("sample s/step", lambda r, w: r["phase_s"]["sample (incl. text encode, VAE decode)"]),
                       ("update s/step", lambda r, w: r["phase_s"]["update"]),
                       ("whole process wall s", lambda r, w: w)):
        per_side = {s: statistics.median(get(*rw) for runs in all_runs for rw in runs if rw[0]["side"] == s)
                    for s in sides}
        ratios = [get(*next(rw for rw in runs if rw[0]["side"] == "diffalign"))
                  / get(*next(rw for rw in runs if rw[0]["side"] == "trl")) for runs in all_runs]
        print(f"{label:26s}" + "".join(f"{per_side[s]:20.3f}" for s in sides)
              + f"{statistics.median(ratios):15.2f}   " + " ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
