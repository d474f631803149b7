"""Several processes train as one: 2 gloo processes x 1 pair give the weights of 1 process x 2 pairs."""

import os
import subprocess
import sys

import pytest
from conftest import in_this_process
from safetensors.torch import load_file

FULL = ["lora.enabled=false", "train.lr=1e-4"]
SETTINGS = ["train.lr=1e-3", "train.log_every=1", "train.report_to=none", "train.max_steps=3",
            "data.resolution=64", "data.num_workers=0", "lora.rank=4"]


@pytest.fixture(scope="module")
def toy(toy_pairs):
    return toy_pairs


_ONE_PROCESS: dict[tuple, object] = {}     # one-process reference runs, trained once per setting per session


def one_process(key, train):
    """``train()``'s result, trained the first time ``key`` is asked for: several tests (here and in
    test_deepspeed.py) compare different engines with the same one-process run."""
    if key not in _ONE_PROCESS:
        _ONE_PROCESS[key] = train()
    return _ONE_PROCESS[key]


def reference(tmp_path_factory, pipeline, toy, method):
    """The one-process, 2-pair run of configs/tiny_dpo_sd15.yaml with ``method``: its output folder."""
    def train():
        out = tmp_path_factory.mktemp("one") / "run"
        _train(1, 2, out, pipeline, toy, method)
        return out
    return one_process(("dpo", str(pipeline), str(toy), *method), train)


def lora_of(out):
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def _train(processes, batch_size, out, pipeline, toy, method):
    args = ["train", "configs/tiny_dpo_sd15.yaml", f"model.pretrained={pipeline}", f"data.path={toy}",
            f"output_dir={out}", f"train.batch_size={batch_size}", *SETTINGS, *method]
    if processes == 1:
        in_this_process(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m",
               "diffalign.cli", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}    # torchrun's setting: the same float reductions as above
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    lora = out / "final" / "pytorch_lora_weights.safetensors"
    return load_file(lora) if lora.is_file() else None


@pytest.mark.parametrize("method", [["method.name=dpo"], ["method.name=mapo"],
                                    ["method.name=inpo", "method.inversion_steps=4"]], ids=lambda m: m[0][12:])
def test_two_processes_of_one_pair_train_like_one_process_of_two(method, tiny_pipelines, toy, tmp_path,
                                                                 tmp_path_factory):
    """Each pair draws its latent sample, t and noise (InPO: and its inversion noise) from its own seed, so the
    draws do not depend on the process count; DDP averages the two halves' gradients into the global batch's."""
    alone = lora_of(reference(tmp_path_factory, tiny_pipelines["sd15"], toy, method))
    joined = _train(2, 1, tmp_path / "two", tiny_pipelines["sd15"], toy, method)
    assert alone.keys() == joined.keys()
    moved = {k: v.norm().item() for k, v in alone.items() if "lora_B" in k}       # B starts at zero
    assert min(moved.values()) > 0
    # per tensor, the layouts' difference against the update itself: 9e-4 for DPO (Adam turns float noise in
    # near-zero gradients into visible steps); 2.9 before each pair drew from its own seed
    gap = max((alone[k] - joined[k]).norm().item() / moved[k] for k in moved)
    assert gap < 1e-2


ALIGNPROP = ["train.max_steps=3", "train.checkpoint_every=0", "method.truncation=uniform", "method.eta=1.0",
             "train.lr=1e-3"]


def alignprop_train(processes, batch_size, out, pipeline, *extra, launcher=None, env=None):
    """configs/tiny_alignprop_sd15.yaml on ``processes`` gloo processes; the final LoRA."""
    entry = [str(launcher)] if launcher else ["-m", "diffalign.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), *entry, "train",
           "configs/tiny_alignprop_sd15.yaml", f"model.pretrained={pipeline}", f"output_dir={out}",
           f"train.batch_size={batch_size}", *ALIGNPROP, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def alignprop_reference(tmp_path_factory, pipeline):
    def train():
        out = tmp_path_factory.mktemp("one") / "run"
        in_this_process(["train", "configs/tiny_alignprop_sd15.yaml", f"model.pretrained={pipeline}",
                         f"output_dir={out}", "train.batch_size=2", *ALIGNPROP])
        return load_file(out / "final" / "pytorch_lora_weights.safetensors")
    return one_process(("alignprop", str(pipeline)), train)


def test_alignprop_on_two_processes_trains_like_one(tiny_pipelines, tmp_path, tmp_path_factory):
    """Each image's initial noise and eta noise come from its prompt's seed, and the truncation K from the
    batch_seed every process shares: 2 processes x 1 prompt sample what 1 process x 2 prompts samples."""
    alone = alignprop_reference(tmp_path_factory, tiny_pipelines["sd15"])
    joined = alignprop_train(2, 1, tmp_path / "two", tiny_pipelines["sd15"])
    keys = [k for k in alone if "lora_B" in k]
    assert min(alone[k].norm() for k in keys) > 0
    assert _relative_gap(alone, joined, keys) < 1e-2


# accelerate runs FSDP only on accelerators: on CPU it falls back to DDP (MULTI_CPU) whatever the config says. The
# launcher lifts that one refusal, so accelerate's own FSDP2 preparation (fully_shard per _no_split_modules block)
# runs over gloo here, as `accelerate launch --config_file configs/accelerate/fsdp2.yaml` sets it up on GPUs.
FSDP_LAUNCHER = """
import os
import sys
import accelerate
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_prepare = accelerate.Accelerator.prepare

def prepare(self, *args, **kwargs):
    self.state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    return _prepare(self, *args, **kwargs)

accelerate.Accelerator.prepare = prepare
if os.environ.get("GRAPH_LOG"):                 # a torch.compile backend that notes each graph it compiles
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    @register_backend(name="counting")
    def counting(gm, example_inputs):
        with open(os.environ["GRAPH_LOG"], "a") as log:
            log.write(os.environ["RANK"] + "\\n")
        return lookup_backend("aot_eager")(gm, example_inputs)
from diffalign import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _fsdp_train(out, pipeline, toy, *extra, env=None):
    launcher = out.parent / "fsdp_launcher.py"
    launcher.write_text(FSDP_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), "train",
           "configs/tiny_dpo_sd15.yaml", f"model.pretrained={pipeline}", f"data.path={toy}", f"output_dir={out}",
           "train.batch_size=1", *SETTINGS, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _relative_gap(a, b, keys):
    return max((a[k] - b[k]).norm().item() / a[k].norm().item() for k in keys)


def test_fsdp2_lora_trains_like_one_process_and_evaluates_through_the_shards(tiny_pipelines, toy, tmp_path,
                                                                           tmp_path_factory):
    import json

    alone = lora_of(reference(tmp_path_factory, tiny_pipelines["sd15"], toy, ["method.name=dpo"]))
    out = tmp_path / "fsdp"
    _fsdp_train(out, tiny_pipelines["sd15"], toy, "train.checkpoint_every=2", "eval.every=3", "eval.every_prompts=1",
                "eval.num_steps=2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["sharded"] is True and state["num_processes"] == 2          # it did run sharded
    joined = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert joined.keys() == alone.keys()
    # 5e-5 measured; an unbroadcast LoRA init (each process's own slice of its own random A) gives 1.3
    assert _relative_gap(alone, joined, [k for k in alone if "lora_B" in k]) < 1e-2
    # in-training evaluation: every process samples through the shards, the main one writes
    assert sorted(p.name for p in (out / "eval").glob("step-*")) == ["step-000000", "step-000003"]


def test_fsdp2_with_compiled_blocks_trains_like_one_process(tiny_pipelines, toy, tmp_path, tmp_path_factory):
    """train.compile under FSDP2: the blocks are compiled before fully_shard wraps them (torchtitan's order), so
    the compiled graphs run between FSDP2's gather and reshard hooks."""
    alone = lora_of(reference(tmp_path_factory, tiny_pipelines["sd15"], toy, ["method.name=dpo"]))
    out, graphs = tmp_path / "fsdp", tmp_path / "graphs.txt"
    _fsdp_train(out, tiny_pipelines["sd15"], toy, "train.checkpoint_every=0", "train.compile=true",
                "train.compile_options={backend: counting}", env={"GRAPH_LOG": str(graphs)})
    ranks = graphs.read_text().split()
    assert ranks.count("0") > 0 and ranks.count("1") == ranks.count("0")     # both compiled the same graphs
    joined = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    # measured 4.9e-5, the same as uncompiled FSDP2 (aot_eager computes what eager does)
    assert _relative_gap(alone, joined, [k for k in alone if "lora_B" in k]) < 1e-2


def test_fsdp2_full_fine_tuning_resumes_and_matches_one_process(tiny_pipelines, toy, tmp_path, tmp_path_factory):
    """The sharded denoiser and its Adam state are gathered into an ordinary checkpoint and scattered back."""
    full = FULL
    one = reference(tmp_path_factory, tiny_pipelines["sd15"], toy, FULL)
    out = tmp_path / "fsdp"
    _fsdp_train(out, tiny_pipelines["sd15"], toy, *full, "train.max_steps=2", "train.checkpoint_every=2")
    log = _fsdp_train(out, tiny_pipelines["sd15"], toy, *full, "train.resume=latest")
    assert "resumed from" in log and "at step 2" in log
    alone = load_file(one / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    joined = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    start = load_file(tiny_pipelines["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert joined.keys() == alone.keys()
    moved = sum((alone[k] - start[k]).square().sum() for k in alone).sqrt()
    gap = sum((alone[k] - joined[k]).square().sum() for k in alone).sqrt()
    # over the whole UNet (per tensor, Adam makes float noise in the near-zero gradients of a few tensors, such
    # as time_emb_proj, into full steps): measured 6.6e-3 for FSDP2 and 6.7e-3 for DDP, uninterrupted
    assert moved > 0 and gap < 2e-2 * moved


def test_fsdp2_alignprop_with_a_random_truncation_draws_the_same_k_on_every_process(tiny_pipelines, tmp_path):
    """Under FSDP2 each denoiser call with gradient is a collective: a K drawn per process would hang them (it did,
    until K came from the trainer's batch_seed, the same on every process)."""
    import json

    out = tmp_path / "fsdp"
    launcher = tmp_path / "fsdp_launcher.py"
    launcher.write_text(FSDP_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(launcher), "train",
           "configs/tiny_alignprop_sd15.yaml", f"model.pretrained={tiny_pipelines['sd15']}", f"output_dir={out}",
           "train.max_steps=3", "train.batch_size=2", "train.checkpoint_every=0", "method.truncation=uniform",
           "train.process_timeout_s=60"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ks = [json.loads(line)["grad_steps"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(ks) == 3 and all(1 <= k <= 4 for k in ks)


def test_shipped_accelerate_configs_load_and_fsdp2_matches_the_tested_settings(monkeypatch):
    """accelerate reads every shipped config; the FSDP2 one builds the plugin the FSDP tests above run
    (version 2, one shard unit per `_no_split_modules` block)."""
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    kinds = {p.stem: load_config_from_file(str(p)).distributed_type for p in Path("configs/accelerate").glob("*.yaml")}
    assert kinds == {"single_gpu": DistributedType.NO, "multi_gpu": DistributedType.MULTI_GPU,
                     "multi_node": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP,
                     "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    for stage in (2, 3):       # what tests/test_deepspeed.py runs: no offload, no zero.Init, accumulation ours
        ds = load_config_from_file(f"configs/accelerate/deepspeed_zero{stage}.yaml").deepspeed_config
        assert (ds["zero_stage"], ds["gradient_accumulation_steps"], ds["zero3_init_flag"]) == (stage, 1, False)
        assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    tested = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")  # no env
    fsdp = load_config_from_file("configs/accelerate/fsdp2.yaml").fsdp_config
    for key, value in fsdp.items():               # as `accelerate launch` hands them to the processes
        monkeypatch.setenv(key.upper(), str(value).lower() if isinstance(value, bool) else str(value))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    shipped = FullyShardedDataParallelPlugin()
    for field in ("fsdp_version", "auto_wrap_policy", "transformer_cls_names_to_wrap", "reshard_after_forward",
                  "cpu_offload", "activation_checkpointing"):
        assert getattr(shipped, field) == getattr(tested, field), field
