"""The latent/text cache: same loss as the uncached path, stale caches refused, training from a cache."""

import json

import pytest
import torch

from diffalign import cli
from diffalign.config import ConfigError, load_config
from diffalign.data.cache import CachedPairs, CacheError, build_cache
from diffalign.data.pairs import PreferencePairs
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
