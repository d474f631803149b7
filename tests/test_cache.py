"""The latent/text cache: same loss as the uncached path, stale caches refused, training from a cache."""

import json
import math

import pytest
import torch

from diffalign import cli
from diffalign.config import ConfigError, load_config
from diffalign.data.cache import CachedPairs, CacheError, build_cache
from diffalign.data.pairs import DataError, PreferencePairs
from diffalign.data.toy import write_toy_pairs
from diffalign.models import load_model
from diffalign.models.lora import add_lora


@pytest.fixture(scope="module")
def setup(tiny_pipelines, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    toy = write_toy_pairs(root / "toy", num_pairs=10, size=80)   # 80 px images: resized and cropped to 64
    args = [f"model.pretrained={tiny_pipelines['sdxl']}", f"data.path={toy}", f"data.cache_dir={root / 'cache'}",
            "data.resolution=64", "data.num_workers=0", "data.cache_dtype=float32", "data.crop=random",
            "data.hflip=0.5", "train.batch_size=2", "train.report_to=none", f"output_dir={root / 'run'}"]
    assert cli.main(["cache", "configs/tiny_dpo_sdxl.yaml", *args]) == 0
    return root, args


def test_manifest_records_settings_and_counts(setup):
    root, _ = setup
    manifest = json.loads((root / "cache" / "manifest.json").read_text())
    assert manifest["num_pairs"] == 10 and manifest["num_prompts"] == 1 + 8   # "" + 8 distinct toy prompts
    assert manifest["key"]["data"]["resolution"] == 64 and manifest["key"]["data"]["hflip"] == 0.5
    assert manifest["key"]["model"]["pretrained"].endswith("sdxl")


def test_cached_and_uncached_give_the_same_loss(setup):
    _, args = setup
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", args)
    model = load_model(cfg.model)
    params = add_lora(model.denoiser, cfg.lora)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))
    raw, cached = PreferencePairs(cfg.data, seed=cfg.train.seed), CachedPairs(cfg)
    assert len(raw) == len(cached) == 10
    idx = [3, 7, 1]
    raw_batch = raw.collate([raw[i] for i in idx])
    cached_batch = cached.collate([cached[i] for i in idx])
    torch.testing.assert_close(cached_batch["original_sizes"], raw_batch["original_sizes"])
    torch.testing.assert_close(cached_batch["crops"], raw_batch["crops"])
    losses = []
    for batch in (raw_batch, cached_batch):
        torch.manual_seed(123)                 # fixes the VAE sample noise, t and the forward noise alike
        loss, metrics = cfg.method.loss(model, batch)
        losses.append((loss, metrics["err_w"], metrics["ref_err_l"]))
    (loss_a, *errs_a), (loss_b, *errs_b) = losses
    for a, b in zip(errs_a, errs_b, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # beta = 5000 scales error differences of ~1e-7 (fp32 VAE encodes at different batch sizes) into ~1e-4
    torch.testing.assert_close(loss_a, loss_b, atol=1e-3, rtol=1e-3)


def test_stale_cache_is_refused_with_the_differences(setup):
    _, args = setup
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", [*args, "data.resolution=32"])
    with pytest.raises(CacheError, match=r"(?s)stale.*data.resolution: cache has 64, config has 32.*diffalign cache"):
        CachedPairs(cfg)


def test_missing_cache_names_the_command(setup, tmp_path):
    _, args = setup
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", [*args, f"data.cache_dir={tmp_path / 'none'}"])
    with pytest.raises(CacheError, match="diffalign cache CONFIG"):
        CachedPairs(cfg)


def test_train_builds_a_missing_cache_first_in_the_same_process(setup, tmp_path):
    _, args = setup
    cache, out = tmp_path / "fresh-cache", tmp_path / "run"
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *args, f"data.cache_dir={cache}", f"output_dir={out}",
                     "train.max_steps=1", "train.checkpoint_every=0"]) == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_pairs"] == 10 and (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_up_to_date_cache_is_not_rebuilt(setup):
    root, args = setup
    shard = root / "cache" / "pairs-00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", args)
    build_cache(cfg, model=None)
    assert shard.stat().st_mtime_ns == stamp


def test_training_from_the_cache(setup):
    root, args = setup
    code = cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *args, "train.max_steps=2", "data.caption_dropout=0.5"])
    assert code == 0
    assert (root / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


# ------------------------------------------------------------------------------------------- real-size faults


def read_cache(folder):
    from safetensors.torch import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [load_file(folder / s["file"]) for s in manifest["pair_shards"]]
    return manifest, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def test_cache_loads_no_unet_and_encodes_in_small_batches(setup, tmp_path, monkeypatch):
    """Encoders only, on the process's device; shards of cache_shard_pairs filled cache_batch_size pairs at a
    time; the tensors equal those of the one-shard cache built with the default batch."""
    root, args = setup
    from diffusers import UNet2DConditionModel

    from diffalign.models.base import DiffusionModel

    def no_unet(*a, **k):
        raise AssertionError("the cache loaded a UNet")

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", no_unet)
    images_per_call = []
    encode = DiffusionModel.encode_images

    def counting(self, pixels):
        images_per_call.append(pixels.shape[0])
        return encode(self, pixels)

    monkeypatch.setattr(DiffusionModel, "encode_images", counting)
    small = tmp_path / "small"
    assert cli.main(["cache", "configs/tiny_dpo_sdxl.yaml", *args, f"data.cache_dir={small}",
                     "data.cache_batch_size=3", "data.cache_shard_pairs=4"]) == 0
    manifest, tensors = read_cache(small)
    assert [s["count"] for s in manifest["pair_shards"]] == [4, 4, 2] and manifest["device"] == "cpu"
    assert max(images_per_call) == 6                        # 3 pairs = 6 images per VAE call, never a shard
    _, reference = read_cache(root / "cache")
    for key in reference:
        torch.testing.assert_close(tensors[key], reference[key], atol=1e-5, rtol=1e-4)


def test_two_processes_write_one_cache(setup, tmp_path):
    import subprocess
    import sys

    root, args = setup
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffalign.cli", "cache",
           "configs/tiny_dpo_sdxl.yaml", *args, f"data.cache_dir={out}", "data.cache_shard_pairs=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest, tensors = read_cache(out)
    assert [s["count"] for s in manifest["pair_shards"]] == [4, 4, 2]
    _, reference = read_cache(root / "cache")
    for key in reference:
        torch.testing.assert_close(tensors[key], reference[key], atol=1e-5, rtol=1e-4)
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", [*args, f"data.cache_dir={out}", "data.cache_shard_pairs=4"])
    assert len(CachedPairs(cfg)) == 10


def test_offloaded_encoders_train_from_the_cache(setup, monkeypatch):
    """data.offload_encoders: the run never calls the VAE or the text encoders (they stay on the CPU)."""
    root, args = setup
    from diffalign.models.base import DiffusionModel

    def refuse(*a, **k):
        raise AssertionError("an encoder ran while training from the cache")

    from diffalign.models import SDXLModel

    offloaded = []
    monkeypatch.setattr(DiffusionModel, "encode_images", refuse)
    monkeypatch.setattr(SDXLModel, "encode_prompt", refuse)
    monkeypatch.setattr(DiffusionModel, "offload_encoders", lambda self: offloaded.append(self))
    code = cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *args, "train.max_steps=2", "data.offload_encoders=true",
                     "train.overwrite=true"])
    assert code == 0 and len(offloaded) == 1          # asked for, and the run needed no encoder
    with pytest.raises(ConfigError, match="needs a latent cache"):
        from diffalign.trainer import Trainer

        Trainer(load_config("configs/tiny_dpo_sdxl.yaml", [*args, "data.cache_dir=null", "data.offload_encoders=true"]))


def test_precomputed_reference_errors_equal_the_online_reference_and_train_without_it(setup, tmp_path):
    """`diffalign cache ... data.reference_epochs=2` stores the base model's errors per (epoch, pair) at each pair's
    seeded draws; with method.reference=precomputed the DPO loss equals the one with the online reference at the
    same draws, and full fine-tuning keeps no frozen copy."""
    from diffalign.data.reference import build_reference_errors
    from diffalign.data.sampler import example_seeds
    from diffalign.methods.dpo import pair_errors, seeded_pairs
    from diffalign.trainer import Trainer

    root, args = setup
    pre = [*args, "data.reference_epochs=2", "method.reference=precomputed"]
    cfg = load_config("configs/tiny_dpo_sdxl.yaml", pre)
    build_reference_errors(cfg)
    data = CachedPairs(cfg)
    assert data.reference_epochs == 2 and data.ref_errors.shape == (2, 10, 2)
    model = load_model(cfg.model)
    params = add_lora(model.denoiser, cfg.lora)
    with torch.no_grad():
        for p in params:
            p.add_(0.02 * torch.randn_like(p))                        # the policy differs from the reference
    data.set_epoch(1)
    batch = data.collate([data[i] for i in (4, 9, 2)])
    batch["seeds"] = example_seeds(cfg.train.seed, 1, len(data), [4, 9, 2])
    pn, cond = seeded_pairs(model, batch)
    with model.reference():
        online = torch.stack(pair_errors(model, pn, cond), dim=1)
    torch.testing.assert_close(online, batch["ref_errors"], atol=1e-6, rtol=1e-5)
    err_w, err_l = pair_errors(model, pn, cond)
    assert not torch.allclose(err_w, online[:, 0])                    # so the comparison can fail
    loss, metrics = cfg.method.loss(model, batch)
    from diffalign.losses import diffusion_dpo

    expected, _ = diffusion_dpo(err_w, err_l, online[:, 0], online[:, 1], cfg.method.beta)
    torch.testing.assert_close(loss, expected, atol=1e-4, rtol=1e-4)
    full = load_config("configs/tiny_dpo_sdxl.yaml", [*pre, "lora.enabled=false", f"output_dir={tmp_path / 'ft'}",
                                                      "train.max_steps=2", "train.checkpoint_every=0"])
    trainer = Trainer(full)
    assert trainer.model.ref_denoiser is None                         # no frozen copy
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    # policy = reference at step 1, up to float32 rounding of errors computed in another batch layout (~1e-7
    # relative), which the loss sees multiplied by beta; a wrong draw would be off by beta * ~1e-2
    tol = cfg.method.beta * 2e-7
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(2), abs=tol)
    assert rows[-1]["loss"] != pytest.approx(math.log(2), abs=tol)                              # then it trains
    with pytest.raises(ConfigError, match=r"reference errors cover 2 epochs; train.max_steps = 20 reaches 4"):
        Trainer(load_config("configs/tiny_dpo_sdxl.yaml", [*pre, f"output_dir={tmp_path / 'x'}",
                                                           "train.max_steps=20"]))
    with pytest.raises(DataError, match=r"reference errors were computed with other settings \(caption_dropout\)"):
        CachedPairs(load_config("configs/tiny_dpo_sdxl.yaml", [*pre, "data.caption_dropout=0.1"]))
