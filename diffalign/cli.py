"""Command line: ``diffalign train | cache | relabel | pairs | iterate | sample | eval | data check | export |
demo | tiny``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Sequence

from diffalign.config import ConfigError, describe_options, load_config

USAGE_OVERRIDES = "key=value overrides, e.g. train.max_steps=2000 data.path=/data/pickapic_v2 (see below)"


def _options_epilog() -> str:
    lines = ["options (key  default  meaning):"]
    for key, default, help_ in describe_options():
        lines.append(f"  {key} = {default}")
        lines += textwrap.wrap(help_, 100, initial_indent="      ", subsequent_indent="      ")
    from diffalign.methods import METHODS

    for name, cls in METHODS.items():
        lines.append(f"method options for method.name={name}:")
        for key, default, help_ in describe_options(cls, "method."):
            if key != "method.name":
                lines.append(f"  {key} = {default}")
                lines += textwrap.wrap(help_, 100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description="Preference alignment for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    for name, text in (("train", "train with a method on preference data"),
                       ("cache", "pre-encode latents and text embeddings into data.cache_dir"),
                       ("sample", "generate eval.prompts x eval.seeds from the base model and eval.checkpoints "
                                  "(same initial noise for all) into output_dir/samples + metadata.jsonl"),
                       ("eval", "sample (reusing images on disk), score with eval.rewards, and write win rates "
                                "against the base, grids and report.html under output_dir")):
        p = sub.add_parser(name, help=text, description=text, epilog=_options_epilog(), formatter_class=fmt)
        p.add_argument("config", help="YAML config file (holds only deviations from the defaults)")
        p.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    relabel = sub.add_parser("relabel", help="score both images of every pair in data.* with a reward and keep or "
                                              "flip the label (AI feedback)", epilog=_options_epilog(),
                             formatter_class=fmt)
    relabel.add_argument("config", help="YAML config whose data.* section names the pairs")
    relabel.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    relabel.add_argument("--reward", required=True,
                         help="a reward name, or a YAML mapping such as '{name: pickscore, model_name: /w/pickscore}'")
    relabel.add_argument("--out", required=True, help="folder for pairs.jsonl and images/")
    relabel.add_argument("--margin", type=float, default=0.0, help="flip only when the loser wins by more than this")
    pairs = sub.add_parser("pairs", help="on-policy preference pairs: sample --samples images per prompt of "
                                          "data.prompts, score them, write the best and worst of each as a "
                                          "Pick-a-Pic-schema parquet that DPO, MaPO and InPO train on",
                           epilog=_options_epilog(), formatter_class=fmt)
    pairs.add_argument("config", help="YAML config (data.prompts, model.*, eval.* sampler settings)")
    pairs.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    pairs.add_argument("--reward", required=True, help="a reward name or a YAML mapping, as for relabel")
    pairs.add_argument("--out", required=True, help="folder for train-00000.parquet")
    pairs.add_argument("--samples", type=int, default=8,
                       help="N, images per prompt (prompt i gets the seeds --seed + i*N .. --seed + (i+1)*N - 1)")
    pairs.add_argument("--seed", type=int, default=0, help="first seed")
    pairs.add_argument("--weights", help="sample these weights instead of the base: a LoRA, full or run folder")
    pairs.add_argument("--margin", type=float, default=0.0, help="no pair when best - worst <= this")
    it = sub.add_parser("iterate", help="online / iterative DPO: rounds of on-policy pairs from the latest model "
                                        "and a run of the configured pair method on them", epilog=_options_epilog(),
                        formatter_class=fmt)
    it.add_argument("config", help="YAML config of the pair method (data.prompts, model.*, eval.* sampler settings)")
    it.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    it.add_argument("--reward", required=True, help="a reward name or a YAML mapping")
    it.add_argument("--iterations", type=int, default=3, help="rounds of pairs + training")
    it.add_argument("--samples", type=int, default=8, help="images per prompt per round")
    it.add_argument("--margin", type=float, default=0.0, help="no pair when best - worst <= this")
    demo = sub.add_parser("demo", help="train Diffusion-DPO on the shipped toy base model and generated pairs, then "
                                       "evaluate it against the base")
    demo.add_argument("--out", default="runs/demo", help="folder for the tiny model, data and run")
    demo.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    tiny = sub.add_parser("tiny", help="write a tiny pipeline: random weights (sd15, sd2, sdxl, sd3, flux) for tests, "
                                       "or a trained toy base model (toy: SD 1.5 architecture; toy-flow: SD3 "
                                       "architecture; coloured shapes, 32 px)")
    tiny.add_argument("family", choices=["sd15", "sd2", "sdxl", "sd3", "flux", "toy", "toy-flow"])
    tiny.add_argument("path")
    data = sub.add_parser("data", help="inspect a preference data set before training on it")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="decode every image of data.* once, in parallel, and report the "
                                              "unreadable rows, ties, duplicates, prompt count and image sizes "
                                              "(exit 1 when a pair cannot be read)")
    check.add_argument("config", help="YAML config whose data.* section names the pairs")
    check.add_argument("overrides", nargs="*", help=USAGE_OVERRIDES)
    check.add_argument("--workers", type=int, default=2, help="DataLoader worker processes decoding images")
    check.add_argument("--json", default=None, help="also write the report to this JSON file")
    check.add_argument("--show", type=int, default=20, help="unreadable pairs listed")
    from diffalign.export_cli import add_parser as add_export

    add_export(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "export":
        from diffalign.export_cli import run as run_export

        return run_export(args)
    if args.command == "demo":
        from diffalign.demo import run_demo

        return run_demo(args.out, args.overrides)
    if args.command == "tiny":
        from diffalign.models.tiny import build_tiny_pipeline
        from diffalign.models.toy import write_toy_flow_pipeline, write_toy_pipeline

        writers = {"toy": write_toy_pipeline, "toy-flow": write_toy_flow_pipeline}
        write = writers.get(args.family) or (lambda path: build_tiny_pipeline(args.family, path))
        print(write(args.path))
        return 0
    cfg = load_config(args.config, args.overrides)
    commands = {"relabel": _relabel, "data": _data, "pairs": _pairs, "iterate": _iterate, "cache": _cache,
                "sample": _evaluate, "eval": _evaluate}
    return commands.get(args.command, _train)(cfg, args)


def _train(cfg, args: argparse.Namespace) -> int:
    from diffalign.trainer import train
    from diffalign.workers import is_main_process

    final = train(cfg)
    if is_main_process():                 # one line per run, not one per launched process
        print(f"final weights: {final}")
    return 0


def _cache(cfg, args: argparse.Namespace) -> int:
    from diffalign.data.cache import build_cache
    from diffalign.workers import is_main_process

    path = build_cache(cfg)
    if cfg.data.reference_epochs and is_main_process():
        from diffalign.data.reference import build_reference_errors

        print(build_reference_errors(cfg))
    if is_main_process():
        print(path)
    return 0


def _data(cfg, args: argparse.Namespace) -> int:
    from diffalign.data.check import run_check

    return run_check(cfg, args.workers, args.json, args.show)


def _iterate(cfg, args: argparse.Namespace) -> int:
    from diffalign.onpolicy import iterate

    for k, final in enumerate(iterate(cfg, _reward(args.reward), args.samples, args.iterations, args.margin), 1):
        print(f"round {k}: {final}")
    return 0


def _relabel(cfg, args: argparse.Namespace) -> int:
    from diffalign.relabel import relabel

    reward = _reward(args.reward)
    counts = relabel(cfg.data, reward, args.out, args.margin)
    print(f"{counts['pairs']} pairs scored with {reward.name}, {counts['flipped']} flipped, {counts['skipped']} "
          f"skipped -> {args.out}/pairs.jsonl")
    return 0


def _pairs(cfg, args: argparse.Namespace) -> int:
    from diffalign.onpolicy import generate_pairs

    reward = _reward(args.reward)
    counts = generate_pairs(cfg, reward, args.out, args.samples, args.weights, args.margin, args.seed)
    print(f"{counts['prompts']} prompts x {args.samples} samples scored with {reward.name}: {counts['pairs']} pairs, "
          f"{counts['ties']} prompts without a margin -> {args.out}/train-00000.parquet (data.path={args.out})")
    return 0


def _reward(spec: str):
    import yaml

    from diffalign.rewards import reward_from_config

    try:
        return reward_from_config(yaml.safe_load(spec))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"--reward: {err}") from None


def _evaluate(cfg, args: argparse.Namespace) -> int:
    from diffalign.workers import is_main_process

    command = args.command
    if command == "sample":
        from diffalign.eval.sample import sample

        path = sample(cfg)
        if is_main_process():
            print(f"metadata: {path}")
        return 0
    from diffalign.eval.evaluate import evaluate, summary_lines

    results = evaluate(cfg)
    if results is None:          # not the main process of a multi-process launch
        return 0
    print("\n".join(summary_lines(results)))
    print(f"results: {cfg.output_dir}/results.json  report: {cfg.output_dir}/report.html")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from diffalign.checkpoint import CheckpointError
    from diffalign.data.cache import CacheError
    from diffalign.data.pairs import DataError
    from diffalign.trainer import TrainingDiverged

    logging.basicConfig(level=os.environ.get("DIFFALIGN_LOG", "INFO"), format="%(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (ConfigError, DataError, CacheError, CheckpointError, FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
