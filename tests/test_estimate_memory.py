"""scripts/estimate_gpu_memory.py on tiny models: its FSDP2 prediction (a fake process group, fake tensors)
divides the sharded state by the ranks and frees each gathered block after use."""

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture
def estimator():
    import estimate_gpu_memory
    import torch.distributed as dist

    yield estimate_gpu_memory
    if dist.is_initialized():        # the fake process group must not outlive the test
        dist.destroy_process_group()


def test_fsdp2_prediction_shards_the_state_and_frees_the_gathered_blocks(estimator):
    args = argparse.Namespace(batch=1, alignprop_steps=2, tiny=True, tiny_resolution=64, flops=False)
    one = estimator.estimate("sdxl", "dpo", True, args, "full-precomputed")
    two = estimator.estimate("sdxl", "dpo", True, args, "full-precomputed", shards=2)
    assert "FSDP2" in two["case"] and two["peak_gib"] < one["peak_gib"]
    # gradients and Adam's moments: each rank holds its half (fp32 shards)
    assert two["lora_grads_gib"] == pytest.approx(one["lora_grads_gib"] / 2, rel=0.02)
    assert two["adam_gib"] == pytest.approx(one["adam_gib"] / 2, rel=0.02)
    # FSDP2 frees a block's gathered bf16 weights by resizing their storage in place; a counter that missed the
    # resizes would hold the whole bf16 denoiser (half the fp32 gradients' bytes) on top of the activations
    assert two["rest_gib"] < one["rest_gib"] + one["lora_grads_gib"] / 4


def test_flow_transformers_have_the_published_sizes():
    """The real-size SD3.5 Medium and FLUX.1-dev transformers the predictions build (on the meta device here):
    2.47B and 11.9B tensors' elements, as their bf16 weight files (4.94 GB, 23.8 GB) hold; SD3's count includes its
    persistent 384 x 384 position table."""
    import diffusers
    import torch

    from diffalign.models.full_size import FLOW_TRANSFORMERS

    counts = {}
    for family, (name, config) in FLOW_TRANSFORMERS.items():
        with torch.device("meta"):
            model = getattr(diffusers, name)(**config)
        counts[family] = sum(t.numel() for t in model.state_dict().values())
    assert counts["sd35m"] == pytest.approx(2.47e9, rel=5e-3)
    assert counts["flux"] == pytest.approx(11.90e9, rel=5e-3)


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")   # rms_norm's fused path, on CPU
def test_flow_family_prediction_runs_the_flow_step_on_fake_tensors(estimator):
    args = argparse.Namespace(batch=1, alignprop_steps=2, tiny=True, tiny_resolution=64, flops=False)
    lora = estimator.estimate("flux", "dpo", True, args)
    full = estimator.estimate("flux", "dpo", True, args, "full-precomputed")
    assert lora["peak_gib"] > lora["weights_gib"] > 0 and lora["rest_gib"] > 0
    assert full["adam_gib"] == pytest.approx(2 * full["lora_grads_gib"])      # two fp32 moments per fp32 weight
    assert full["lora_grads_gib"] > 5 * lora["lora_grads_gib"]              # every weight, not the adapters
