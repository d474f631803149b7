"""``diffalign export RUN_OR_LORA [--out DIR] [--merge-into DIR] [--family F]``: the LoRA in the kohya format."""

from __future__ import annotations

import argparse

HELP = ("write a run's LoRA also in the kohya / ComfyUI / A1111 format (<name>_kohya.safetensors next to the "
        "diffusers file, or in --out); --merge-into also writes a full denoiser with the LoRA merged in")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help=HELP, description=HELP)
    p.add_argument("lora", metavar="RUN_OR_LORA",
                   help="a run folder (its final/), a checkpoint or LoRA folder, or a pytorch_lora_weights.safetensors")
    p.add_argument("--out", default=None, help="folder for the exported files (default: the LoRA's folder)")
    p.add_argument("--merge-into", default=None, metavar="DIR",
                   help="a base diffusers pipeline folder (or its unet/ / transformer/): also write "
                        "<out>/<name>_merged/<unet|transformer>/ with the LoRA merged into its weights")
    p.add_argument("--family", default=None, choices=["sd15", "sdxl", "sd3", "flux"],
                   help="the model family (default: from the run's config.yaml, else from the LoRA's keys); "
                        "only the metadata's base-model hint depends on it")
    return p


def run(args: argparse.Namespace) -> int:
    import sys

    from diffalign.export import ExportError, export_lora

    try:
        written = export_lora(args.lora, args.out, args.merge_into, args.family)
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"kohya LoRA: {written['kohya']}")
    if "merged" in written:
        print(f"merged denoiser: {written['merged']}")
    return 0
