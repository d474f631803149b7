"""Train the toy base model: a tiny SD 1.5-architecture pipeline for diffalign's world of coloured shapes (CPU).

    python scripts/train_toy_base.py --out runs/toy-base --export diffalign/assets/toy_sd15

The shipped weights (diffalign/assets/toy_sd15, used by `diffalign demo` and `diffalign tiny toy PATH`) were made
with these defaults: about 14 minutes on 2 CPU cores (VAE 175 s, UNet 640 s).

Phases: (0) the tiny random sd15 pipeline from diffalign.models.tiny gives the tokenizer, the text encoder (kept
frozen: different prompts still give different embeddings) and the scheduler; (1) 4000 images drawn with
diffalign.data.toy.draw, captioned "a {colour} {shape} on a grey background", a quarter of them with a WRONG
colour so that the base model is imperfect and preference tuning has something to fix; (2) an AutoencoderKL
with 8x8x4 latents (reconstruction + a small KL; scaling_factor = 1/std of the latents); (3) a
UNet2DConditionModel with the epsilon DDPM loss and 10% empty prompts for classifier-free guidance; (4) save and
reload with StableDiffusionPipeline.from_pretrained; (5) sample colours x shapes x seeds and measure colour and
shape accuracy, writing grid.png and results.json. --export writes the weights in fp16, without the tokenizer
(diffalign.models.toy rebuilds it), as the package ships them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # everything is built locally

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from diffalign.data.toy import COLOURS, SHAPES, draw
from diffalign.models.tiny import build_tiny_pipeline

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)


START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


def prompt(colour: str, shape: str) -> str:
    return f"a {colour} {shape} on a grey background"


# ---------------------------------------------------------------- data
def make_data(n: int, size: int, wrong_frac: float, seed: int):
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, size, size, 3), dtype=np.uint8)
    captions, true_colour = [], []
    for i in range(n):
        c = NAMES[i % 4]
        s = SHAPES[(i // 4) % 2]
        imgs[i] = np.asarray(draw(COLOURS[c], s, size, rng))
        cap_c = c
        if rng.random() < wrong_frac:
            cap_c = NAMES[(NAMES.index(c) + 1 + int(rng.integers(3))) % 4]
        captions.append(prompt(cap_c, s))
        true_colour.append(c)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, captions


# ---------------------------------------------------------------- models
def make_vae(size: int) -> AutoencoderKL:
    blocks = int(math.log2(size // 8)) + 1  # latents are always 8x8
    chans = (16, 32, 32, 32)[:blocks]
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=chans, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=size, scaling_factor=1.0,
    )


def make_unet(cross_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        cross_attention_dim=cross_dim, norm_num_groups=32,
    )


# ---------------------------------------------------------------- eval helpers
def analyse(img: np.ndarray, thresh: float = 60.0):
    """Dominant non-grey colour (index into NAMES or -1) and shape guess from an HxWx3 uint8 image."""
    f = img.astype(np.float32)
    mask = np.linalg.norm(f - 128.0, axis=-1) > thresh
    if mask.mean() < 0.02:
        return -1, None, float(mask.mean())
    mean = f[mask].mean(0)
    colour = int(np.argmin(((PALETTE - mean) ** 2).sum(-1)))
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = mask.sum() / box  # circle ~0.785, square ~1.0
    return colour, ("square" if fill > 0.89 else "circle"), float(mask.mean())


def evaluate_pipeline(pipe: StableDiffusionPipeline, args: argparse.Namespace, out: Path) -> dict:
    """Colour and shape accuracy of colours x shapes x eval_seeds samples; writes grid.png."""
    rows, correct, shape_ok, blank, n = [], 0, 0, 0, 0
    per_colour = {c: [0, 0] for c in NAMES}
    for c in NAMES:
        for s in SHAPES:
            gens = [torch.Generator().manual_seed(1000 + k) for k in range(args.eval_seeds)]
            ims = pipe([prompt(c, s)] * args.eval_seeds, num_inference_steps=20, guidance_scale=args.guidance,
                       generator=gens, height=args.image_size, width=args.image_size, output_type="np").images
            ims = (ims * 255).round().clip(0, 255).astype(np.uint8)
            rows.append(np.concatenate(list(ims), axis=1))
            for im in ims:
                col, shp, _ = analyse(im)
                n += 1
                blank += col < 0
                ok = col == NAMES.index(c)
                correct += ok
                shape_ok += (shp == s)
                per_colour[c][0] += ok
                per_colour[c][1] += 1
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(out / "grid.png")
    # sanity: the metric on real toy images
    rng = np.random.default_rng(123)
    real = [(analyse(np.asarray(draw(COLOURS[c], s, args.image_size, rng))), c, s)
            for c in NAMES for s in SHAPES for _ in range(16)]
    real_col = np.mean([r[0] == NAMES.index(c) for r, c, s in real])
    real_shp = np.mean([r[1] == s for r, c, s in real])
    return {"colour_acc": correct / n, "shape_acc": shape_ok / n, "no_shape_frac": blank / n, "n": n,
            "per_colour_acc": {c: v[0] / v[1] for c, v in per_colour.items()},
            "metric_on_real_images": {"colour_acc": float(real_col), "shape_acc": float(real_shp)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/toy-base")
    ap.add_argument("--export", help="also write the fp16 package assets (no tokenizer) to this folder")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--num-images", type=int, default=4000)
    ap.add_argument("--wrong-frac", type=float, default=0.25)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--unet-lr", type=float, default=1e-3)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--eval-seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}

    # 0. tokenizer / text encoder / scheduler from diffalign's tiny random sd15 pipeline
    rand = build_tiny_pipeline("sd15", out / "random", seed=args.seed)
    tok = CLIPTokenizer.from_pretrained(rand, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(rand, subfolder="text_encoder").eval().requires_grad_(False)
    sched = DDIMScheduler.from_pretrained(rand, subfolder="scheduler")

    # 1. data
    t = time.time()
    x, captions = make_data(args.num_images, args.image_size, args.wrong_frac, args.seed)
    uniq = sorted(set(captions)) + [""]
    with torch.no_grad():
        ids = tok(uniq, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        table = te(ids)[0]  # (len(uniq), 77, 32)
    cap_idx = torch.tensor([uniq.index(c) for c in captions])
    empty_idx = len(uniq) - 1
    timings["data_s"] = time.time() - t
    log(f"data: {len(x)} images {args.image_size}px, {len(uniq) - 1} distinct prompts, {timings['data_s']:.1f}s")

    g = torch.Generator().manual_seed(args.seed)

    # 2. VAE
    t = time.time()
    vae = make_vae(args.image_size)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    lr_fn = lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * s / args.vae_steps))  # noqa: E731
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    for step in range(args.vae_steps):
        b = x[torch.randint(len(x), (args.batch,), generator=g)]
        post = vae.encode(b).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        l_rec = F.l1_loss(rec, b) + F.mse_loss(rec, b)
        l_kl = post.kl().mean() / b[0].numel()
        loss = l_rec + 1e-4 * l_kl * b[0].numel() / z[0].numel()  # KL per latent element, small weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sch.step()
        if step % 250 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step:5d} rec {l_rec.item():.4f} kl/elem {l_kl.item() * b[0].numel() / z[0].numel():.3f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mus, stds = [], []
        for i in range(0, len(x), 256):
            p = vae.encode(x[i : i + 256]).latent_dist
            mus.append(p.mean)
            stds.append(p.std)
        mu, sd = torch.cat(mus), torch.cat(stds)
        z = mu + sd * torch.randn(mu.shape, generator=g)
        scale = float(1.0 / z.std())
        rec_l1 = sum(F.l1_loss(vae.decode(mu[i:i + 256]).sample, x[i:i + 256], reduction="sum").item()
                     for i in range(0, min(512, len(x)), 256)) / x[:512].numel()
    vae.register_to_config(scaling_factor=scale)
    timings["vae_s"] = time.time() - t
    log(f"vae done {timings['vae_s']:.1f}s, latent shape {tuple(mu.shape[1:])}, scaling_factor {scale:.4f}, "
        f"eval L1 (pixels in [-1,1]) {rec_l1:.4f}")

    # 3. UNet
    t = time.time()
    unet = make_unet(te.config.hidden_size)
    log(f"unet params {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M")
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, weight_decay=1e-2)
    lr_fn = lambda s: min(1.0, (s + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.unet_steps)))  # noqa: E731
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    acp = sched.alphas_cumprod
    ema = 0.0
    for step in range(args.unet_steps):
        i = torch.randint(len(x), (args.batch,), generator=g)
        z0 = (mu[i] + sd[i] * torch.randn(mu[i].shape, generator=g)) * scale
        ci = cap_idx[i].clone()
        ci[torch.rand(args.batch, generator=g) < 0.1] = empty_idx
        ts = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = acp[ts].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, ts, encoder_hidden_states=table[ci]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sch.step()
        ema = loss.item() if step == 0 else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == args.unet_steps - 1:
            el = time.time() - t
            log(f"unet step {step:5d} loss {loss.item():.4f} ema {ema:.4f} ({el / (step + 1) * 1000:.0f} ms/step)")
    timings["unet_s"] = time.time() - t
    log(f"unet done {timings['unet_s']:.1f}s, final ema loss {ema:.4f}")

    # 4. save + reload through the public API
    pipe_dir = out / "pipeline"
    if pipe_dir.exists():
        shutil.rmtree(pipe_dir)
    StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet.eval(), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(pipe_dir, safe_serialization=True)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    size_mb = sum(f.stat().st_size for f in pipe_dir.rglob("*") if f.is_file()) / 1e6
    w_mb = sum(f.stat().st_size for f in pipe_dir.rglob("*.safetensors")) / 1e6
    log(f"saved {pipe_dir} ({size_mb:.1f} MB total, {w_mb:.1f} MB safetensors); reloaded "
        f"{type(pipe).__name__}")

    # 5. evaluate
    t = time.time()
    quality = evaluate_pipeline(pipe, args, out)
    timings["eval_s"] = time.time() - t
    res = {
        **quality,
        "guidance": args.guidance, "scaling_factor": scale, "final_unet_ema_loss": ema,
        "vae_eval_l1": rec_l1, "pipeline_mb": size_mb, "weights_mb": w_mb, "timings_s": timings,
        "args": vars(args),
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    log(json.dumps(res, indent=2))
    if args.export:
        export(pipe_dir, Path(args.export))
        log(f"exported fp16 assets to {args.export}")


def export(pipe_dir: Path, dst: Path) -> None:
    """The saved pipeline with fp16 weights and no tokenizer: what diffalign/assets/toy_sd15 holds."""
    from safetensors.torch import load_file, save_file

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(pipe_dir, dst, ignore=shutil.ignore_patterns("tokenizer"))
    for weights in dst.rglob("*.safetensors"):
        save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})


if __name__ == "__main__":
    main()
