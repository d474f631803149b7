"""Train the toy flow base model: a tiny SD3-architecture pipeline (rectified flow, MMDiT) for the toy world (CPU).

    python scripts/train_toy_flow.py --out runs/toy-flow --export diffalign/assets/toy_sd3

The shipped weights were made with these defaults (164 s of training on 2 CPU cores; colour accuracy 0.98,
shape accuracy 0.63 at guidance 4 over colours x shapes x 8 seeds).

The same world and rule as scripts/train_toy_base.py (4000 images of coloured circles and squares, 32 px, a
quarter of the captions naming a WRONG colour), so that preference tuning has something to fix. What differs is
the denoiser and the objective: an SD3Transformer2DModel trained with the rectified-flow loss (velocity
noise - x0, sigma from a logit-normal(0, 1), no shift at 32 px) and 10% empty prompts for guidance. Shared with
the SD 1.5 toy: the VAE (its 8x8x4 latents, shift factor 0). The text encoders are the frozen random CLIP-L /
CLIP-G pair of diffalign's tiny SD3 pipeline, without T5 (its part of the conditioning is one zero token:
model.max_sequence_length = 1). Evaluation samples colours x shapes x seeds through StableDiffusion3Pipeline and
measures colour and shape accuracy with the same colour analysis as the SD 1.5 toy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

sys.path.insert(0, str(Path(__file__).parent))
import train_toy_base as base  # noqa: E402  (the shared world, captions and colour analysis)

from diffalign.models.tiny import build_tiny_pipeline  # noqa: E402
from diffalign.models.toy import write_toy_pipeline  # noqa: E402

SEQ = 1          # T5 tokens (zeros, no T5): the toy's model.max_sequence_length


def log(msg: str) -> None:
    print(f"[{time.time() - base.START:7.1f}s] {msg}", flush=True)


def make_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                 attention_head_dim=16, num_attention_heads=4, joint_attention_dim=64,
                                 caption_projection_dim=64, pooled_projection_dim=64, pos_embed_max_size=8)


def evaluate(pipe: StableDiffusion3Pipeline, args: argparse.Namespace, out: Path) -> dict:
    """Colour and shape accuracy of colours x shapes x eval_seeds images (base.analyse), and a grid."""
    correct = shape_ok = blank = n = 0
    rows = []
    for c in base.NAMES:
        for s in base.SHAPES:
            gens = [torch.Generator().manual_seed(1000 + k) for k in range(args.eval_seeds)]
            ims = pipe([base.prompt(c, s)] * args.eval_seeds, num_inference_steps=20, guidance_scale=args.guidance,
                       max_sequence_length=SEQ, generator=gens, height=32, width=32, output_type="np").images
            ims = (ims * 255).round().clip(0, 255).astype(np.uint8)
            rows.append(np.concatenate(list(ims), axis=1))
            for im in ims:
                col, shp, _ = base.analyse(im)
                n, blank = n + 1, blank + (col < 0)
                correct += col == base.NAMES.index(c)
                shape_ok += shp == s
    from PIL import Image

    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    return {"colour_acc": correct / n, "shape_acc": shape_ok / n, "no_shape_frac": blank / n, "n": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/toy-flow")
    ap.add_argument("--export", help="also write the fp16 package assets to this folder")
    ap.add_argument("--num-images", type=int, default=4000)
    ap.add_argument("--wrong-frac", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--eval-seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 0. text encoders and tokenizers (frozen, random) from the tiny SD3 pipeline; the SD 1.5 toy's VAE
    tiny = StableDiffusion3Pipeline.from_pretrained(build_tiny_pipeline("sd3", out / "random", seed=args.seed))
    vae = AutoencoderKL.from_pretrained(write_toy_pipeline(out / "toy-sd15"), subfolder="vae")
    vae.register_to_config(shift_factor=0.0, force_upcast=False)
    vae.eval().requires_grad_(False)
    pipe_kw = dict(text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, text_encoder_2=tiny.text_encoder_2,
                   tokenizer_2=tiny.tokenizer_2, text_encoder_3=None, tokenizer_3=None)

    # 1. data, latents and the prompt table
    x, captions = base.make_data(args.num_images, 32, args.wrong_frac, args.seed)
    uniq = sorted(set(captions)) + [""]
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        encoder = StableDiffusion3Pipeline(transformer=make_transformer(), vae=vae,
                                           scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), **pipe_kw)
        hidden, _, pooled, _ = encoder.encode_prompt(uniq, None, None, do_classifier_free_guidance=False,
                                                     max_sequence_length=SEQ)
        post = [vae.encode(x[i:i + 256]).latent_dist for i in range(0, len(x), 256)]
        mu, sd = torch.cat([p.mean for p in post]), torch.cat([p.std for p in post])
    scale = vae.config.scaling_factor
    cap_idx = torch.tensor([uniq.index(c) for c in captions])
    log(f"data: {len(x)} images, {len(uniq) - 1} prompts, cond {tuple(hidden.shape[1:])}, "
        f"latents {tuple(mu.shape[1:])}")

    # 2. the transformer, rectified flow
    t0 = time.time()
    model = make_transformer()
    log(f"transformer params {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2)
    lr_fn = lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))  # noqa: E731
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    ema = 0.0
    for step in range(args.steps):
        i = torch.randint(len(x), (args.batch,), generator=g)
        z0 = (mu[i] + sd[i] * torch.randn(mu[i].shape, generator=g)) * scale
        ci = cap_idx[i].clone()
        ci[torch.rand(args.batch, generator=g) < 0.1] = len(uniq) - 1
        sigma = torch.sigmoid(torch.randn(args.batch, generator=g)).view(-1, 1, 1, 1)   # logit-normal(0, 1)
        noise = torch.randn(z0.shape, generator=g)
        zt = (1 - sigma) * z0 + sigma * noise
        pred = model(hidden_states=zt, timestep=sigma.flatten() * 1000, encoder_hidden_states=hidden[ci],
                     pooled_projections=pooled[ci]).sample
        loss = F.mse_loss(pred, noise - z0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sch.step()
        ema = loss.item() if step == 0 else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == args.steps - 1:
            log(f"step {step:5d} loss {loss.item():.4f} ema {ema:.4f} "
                f"({(time.time() - t0) / (step + 1) * 1000:.0f} ms/step)")
    train_s = time.time() - t0

    # 3. save, reload through the public API, evaluate
    pipe_dir = out / "pipeline"
    shutil.rmtree(pipe_dir, ignore_errors=True)
    StableDiffusion3Pipeline(transformer=model.eval(), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                             **pipe_kw).save_pretrained(pipe_dir, safe_serialization=True)
    pipe = StableDiffusion3Pipeline.from_pretrained(pipe_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    quality = evaluate(pipe, args, out)
    results = {**quality, "guidance": args.guidance, "final_ema_loss": ema, "train_s": train_s, "args": vars(args)}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    log(json.dumps(results, indent=2))
    if args.export:
        base.export(pipe_dir, Path(args.export))
        for folder in ("tokenizer_2", "vae"):          # rebuilt / shared at load time (diffalign.models.toy)
            shutil.rmtree(Path(args.export) / folder, ignore_errors=True)
        log(f"exported fp16 assets to {args.export}")


if __name__ == "__main__":
    main()
