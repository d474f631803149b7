"""Several processes train as one: 2 gloo processes x 1 pair give the weights of 1 process x 2 pairs."""

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from diffalign.data.toy import write_toy_pairs

SETTINGS = ["train.lr=1e-3", "train.log_every=1", "train.report_to=none", "train.max_steps=3",
            "data.resolution=64", "data.num_workers=0", "lora.rank=4"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_pairs(tmp_path_factory.mktemp("toy"), num_pairs=8, size=64)


def _train(processes, batch_size, out, pipeline, toy, method):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", "diffalign.cli",
           "train", "configs/tiny_dpo_sd15.yaml", f"model.pretrained={pipeline}", f"data.path={toy}",
           f"output_dir={out}", f"train.batch_size={batch_size}", *SETTINGS, *method]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}     # torchrun's setting, in both runs: the same float reductions
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("method", [["method.name=dpo"], ["method.name=mapo"],
                                    ["method.name=inpo", "method.inversion_steps=4"]], ids=lambda m: m[0][12:])
def test_two_processes_of_one_pair_train_like_one_process_of_two(method, tiny_pipelines, toy, tmp_path):
    """Each pair draws its latent sample, t and noise (InPO: and its inversion noise) from its own seed, so the
    draws do not depend on the process count; DDP averages the two halves' gradients into the global batch's."""
    alone = _train(1, 2, tmp_path / "one", tiny_pipelines["sd15"], toy, method)
    joined = _train(2, 1, tmp_path / "two", tiny_pipelines["sd15"], toy, method)
    assert alone.keys() == joined.keys()
    moved = {k: v.norm().item() for k, v in alone.items() if "lora_B" in k}       # B starts at zero
    assert min(moved.values()) > 0
    # per tensor, the layouts' difference against the update itself: 9e-4 for DPO (Adam turns float noise in
    # near-zero gradients into visible steps); 2.9 before each pair drew from its own seed
    gap = max((alone[k] - joined[k]).norm().item() / moved[k] for k in moved)
    assert gap < 1e-2
