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
