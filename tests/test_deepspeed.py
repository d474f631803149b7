"""DeepSpeed ZeRO through accelerate, on 2 gloo processes: it trains as one process (or as DDP on the same
processes), checkpoints whole, resumes, evaluates through ZeRO-3's partitions and stops on a non-finite step."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_distributed import FULL, SETTINGS, _relative_gap, alignprop_reference, alignprop_train, lora_of, reference

pytest.importorskip("deepspeed", reason="DeepSpeed is in the dev extras: pip install -e '.[dev]'")

# accelerate starts DeepSpeed only on an accelerator: on CPU it leaves the processes undistributed. The launcher
# lifts that one refusal (a gloo process group where accelerate found no device), and the trainer's own CPU
# switch, which would ask accelerate for plain MULTI_CPU. DS_ACCELERATOR=cpu is DeepSpeed's CPU backend (gloo).
# It also skips DeepSpeed's shared-memory all-reduce for CPU tensors, a compiled speed-up that costs a 20 s C++
# build on a fresh machine; without it DeepSpeed's collectives go through torch.distributed's gloo.
DS_LAUNCHER = """
import os
import sys

import accelerate.state
import deepspeed.comm.torch  # noqa: F401  (the attribute of that name is torch itself: take the module)
from accelerate.utils import DistributedType

sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

_prepare_backend = accelerate.state.PartialState._prepare_backend

def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
    found = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if found[1] == DistributedType.NO and int(os.environ.get("LOCAL_RANK", -1)) != -1:
        return "gloo", DistributedType.MULTI_CPU
    return found

accelerate.state.PartialState._prepare_backend = prepare_backend
import diffalign.trainer

diffalign.trainer._cpu_only = lambda: False
if os.environ.get("POISON_AT"):                 # the NaN-guard test: DPO's loss is NaN at that call
    from diffalign.methods.dpo import DiffusionDPO

    calls, original = [0], DiffusionDPO.loss

    def poisoned(self, model, batch):
        calls[0] += 1
        loss, metrics = original(self, model, batch)
        return (loss * float("nan"), metrics) if calls[0] == int(os.environ["POISON_AT"]) else (loss, metrics)

    DiffusionDPO.loss = poisoned
from diffalign import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def toy(toy_pairs):
    return toy_pairs


DS_ENV = {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true"}


def _zero_train(stage, out, config, pipeline, *extra, processes=2, env=None, check=True):
    launcher = out.parent / "ds_launcher.py"
    launcher.write_text(DS_LAUNCHER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), str(launcher),
           "train", config, f"model.pretrained={pipeline}", f"output_dir={out}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **DS_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage), **(env or {})}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def _dpo(stage, out, pipeline, toy, *extra, **kw):
    return _zero_train(stage, out, "configs/tiny_dpo_sd15.yaml", pipeline, f"data.path={toy}", "train.batch_size=1",
                       *SETTINGS, *extra, **kw)


def _engine(checkpoint):
    return json.loads((checkpoint / "trainer_state.json").read_text())["engine"]


def test_zero2_lora_trains_like_one_process_and_resumes_from_its_checkpoint(tiny_pipelines, toy, tmp_path,
                                                                         tmp_path_factory):
    alone = lora_of(reference(tmp_path_factory, tiny_pipelines["sd15"], toy, ["method.name=dpo"]))
    out = tmp_path / "zero2"
    _dpo(2, out, tiny_pipelines["sd15"], toy, "train.max_steps=2", "train.checkpoint_every=2")
    assert _engine(out / "checkpoint-2") == "deepspeed-zero2"
    log = _dpo(2, out, tiny_pipelines["sd15"], toy, "train.resume=latest").stderr   # the LoRA and its Adam state
    assert "resumed from" in log and "at step 2" in log                             # gathered, then set back
    joined = load_file(out / "final" / "pytorch_lora_weights.safetensors")     # the ordinary diffusers LoRA file
    assert joined.keys() == alone.keys()
    # measured 1.1e-4 of the update (fp32), interrupted or not: the same draws, DeepSpeed's reduction for DDP's
    assert _relative_gap(alone, joined, [k for k in alone if "lora_B" in k]) < 1e-2


def test_zero3_full_fine_tuning_resumes_and_matches_one_process(tiny_pipelines, toy, tmp_path, tmp_path_factory,
                                                                capsys):
    """ZeRO-3 partitions the UNet itself: the checkpoint gathers its fp32 masters and Adam moments into the
    ordinary denoiser folder and a name-keyed optimizer file; resume sets them back into the partitions."""
    full = FULL
    one = reference(tmp_path_factory, tiny_pipelines["sd15"], toy, FULL)
    out = tmp_path / "zero3"
    _dpo(3, out, tiny_pipelines["sd15"], toy, *full, "train.max_steps=2", "train.checkpoint_every=2")
    assert _engine(out / "checkpoint-2") == "deepspeed-zero3"
    log = _dpo(3, out, tiny_pipelines["sd15"], toy, *full, "train.resume=latest", "eval.every=3",
               "eval.every_prompts=1", "eval.num_steps=2").stderr
    assert "resumed from" in log and "at step 2" in log
    # in-training evaluation: every process samples through ZeRO-3's partitions, the main one writes
    assert [p.name for p in (out / "eval").glob("step-*")] == ["step-000003"]
    name = "final/unet/diffusion_pytorch_model.safetensors"
    alone, joined = load_file(one / name), load_file(out / name)
    start = load_file(tiny_pipelines["sd15"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert joined.keys() == alone.keys()
    moved = sum((alone[k] - start[k]).square().sum() for k in alone).sqrt()
    gap = sum((alone[k] - joined[k]).square().sum() for k in alone).sqrt()
    assert moved > 0 and gap < 2e-2 * moved          # measured 6.2e-3 (DDP 6.7e-3, FSDP2 6.6e-3)
    # its optimizer file holds ZeRO's moments by name: one process without DeepSpeed may not resume it
    from diffalign import cli

    rc = cli.main(["train", "configs/tiny_dpo_sd15.yaml", f"model.pretrained={tiny_pipelines['sd15']}",
                   f"data.path={toy}", f"output_dir={out}", "train.batch_size=1", *SETTINGS, *full,
                   f"train.resume={out / 'checkpoint-2'}"])
    assert rc != 0 and "engine: checkpoint has 'deepspeed-zero3', config has 'ddp'" in capsys.readouterr().err


def test_zero2_alignprop_with_several_denoiser_calls_per_backward_trains_like_one_process(tiny_pipelines, tmp_path,
                                                                                         tmp_path_factory):
    """AlignProp backpropagates through several sampler steps at once; DeepSpeed's engine reduces once per
    optimizer step (managed accumulation off)."""
    alone = alignprop_reference(tmp_path_factory, tiny_pipelines["sd15"])
    zero = tmp_path / "zero2"
    launcher = tmp_path / "ds_launcher.py"
    launcher.write_text(DS_LAUNCHER)
    joined = alignprop_train(2, 1, zero, tiny_pipelines["sd15"], launcher=launcher, env=DS_ENV | {
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})
    assert _relative_gap(alone, joined, [k for k in alone if "lora_B" in k]) < 1e-2
    steps = [json.loads(line)["grad_steps"] for line in (zero / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 3 and all(1 <= k <= 4 for k in steps)


def test_zero2_stops_on_a_non_finite_step_without_writing_it(tiny_pipelines, toy, tmp_path):
    out = tmp_path / "zero2"
    done = _dpo(2, out, tiny_pipelines["sd15"], toy, "train.max_steps=4", "train.checkpoint_every=1",
                env={"POISON_AT": "2"}, check=False)
    assert done.returncode != 0
    assert "non-finite loss or gradient at step 2; the update was not applied" in done.stderr
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists() and not (out / "final").exists()


OFFLOAD = {"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}


def _full_ft_resumed_gap(stage, out, pipeline, toy, tmp_path_factory, env):
    """Full fine-tuning under ZeRO-``stage`` with ``env``, interrupted at step 2 and resumed: how far its UNet is
    from the one-process run's, as a fraction of that run's whole update."""
    one = reference(tmp_path_factory, pipeline, toy, FULL)
    _dpo(stage, out, pipeline, toy, *FULL, "train.max_steps=2", "train.checkpoint_every=2", env=env)
    log = _dpo(stage, out, pipeline, toy, *FULL, "train.resume=latest", env=env).stderr
    assert "resumed from" in log and "at step 2" in log
    name = "final/unet/diffusion_pytorch_model.safetensors"
    alone, joined = load_file(one / name), load_file(out / name)
    start = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    moved = sum((alone[k] - start[k]).square().sum() for k in alone).sqrt()
    assert moved > 0
    return (sum((alone[k] - joined[k]).square().sum() for k in alone).sqrt() / moved).item()


@pytest.mark.slow
def test_zero2_cpu_offload_full_fine_tuning_resumes_and_matches_one_process(tiny_pipelines, toy, tmp_path,
                                                                            tmp_path_factory):
    """ZeRO-Offload (offload_optimizer_device: cpu): accelerate swaps AdamW for DeepSpeed's CPU Adam (the same
    update), whose state the checkpoint gathers and resume sets back. Slow: the first run builds the CPU Adam
    kernel (about 40 s on 2 cores), so it runs with `pytest -m slow`, not in the default suite."""
    gap = _full_ft_resumed_gap(2, tmp_path / "offload", tiny_pipelines["sd15"], toy, tmp_path_factory, OFFLOAD)
    assert gap < 2e-2          # measured 6.6e-3, as without offload


@pytest.mark.slow
def test_zero3_with_optimizer_and_parameter_offload_trains_lora_like_one_process(tiny_pipelines, toy, tmp_path,
                                                                                 tmp_path_factory):
    alone = lora_of(reference(tmp_path_factory, tiny_pipelines["sd15"], toy, ["method.name=dpo"]))
    out = tmp_path / "offload3"
    _dpo(3, out, tiny_pipelines["sd15"], toy, env=OFFLOAD | {"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"})
    joined = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert _relative_gap(alone, joined, [k for k in alone if "lora_B" in k]) < 1e-2     # measured 7.2e-5


@pytest.mark.slow
def test_zero3_nvme_offload_full_fine_tuning_resumes_and_matches_one_process(tiny_pipelines, toy, tmp_path,
                                                                             tmp_path_factory):
    """ZeRO-Infinity (optimizer and parameters offloaded to NVMe, here a folder): each subgroup's fp32 partition
    and Adam state live in swap files. Resume makes Adam's state before any step has run, which needs the subgroup
    swapped in first (without it: "start (0) + length (576) exceeds dimension size (0)"). Slow: DeepSpeed builds
    its async I/O kernel (needs libaio-dev) and CPU Adam on first use."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async_io op cannot build here: apt-get install libaio-dev")
    swap = tmp_path / "swap"
    nvme = {f"ACCELERATE_DEEPSPEED_OFFLOAD_{part}_{key}": value for part in ("OPTIMIZER", "PARAM")
            for key, value in (("DEVICE", "nvme"), ("NVME_PATH", str(swap)))}
    gap = _full_ft_resumed_gap(3, tmp_path / "nvme", tiny_pipelines["sd15"], toy, tmp_path_factory, nvme)
    assert any(swap.rglob("*.swp"))                                          # it did swap to the folder
    assert gap < 2e-2          # measured 3.5e-3


def test_deepspeed_settings_that_contradict_the_run_are_refused():
    """The engine is configured from the run's settings; an accelerate config that says otherwise is refused
    (the real plugin, as `accelerate launch` builds it; only the Accelerator around it is a stand-in)."""
    from types import SimpleNamespace

    from accelerate.utils import DeepSpeedPlugin, DistributedType

    from diffalign.config import ConfigError, load_config
    from diffalign.trainer import Trainer

    cfg = load_config("configs/tiny_dpo_sd15.yaml")

    def configure(**plugin):
        plugin = DeepSpeedPlugin(zero_stage=2, **plugin)
        acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                              state=SimpleNamespace(deepspeed_plugin=plugin))
        assert Trainer.configure_deepspeed(SimpleNamespace(cfg=cfg, acc=acc)) is True
        return plugin.deepspeed_config

    ds = configure(gradient_clipping=cfg.train.max_grad_norm)
    assert ds["managed_gradient_accumulation"] is False and ds["gradient_accumulation_steps"] == 1
    assert (ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"]) == (cfg.train.batch_size,
                                                                             2 * cfg.train.batch_size)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=4.*train.grad_accum"):
        configure(gradient_accumulation_steps=4)
    with pytest.raises(ConfigError, match="gradient_clipping=0.25.*train.max_grad_norm"):
        configure(gradient_clipping=0.25)
    cfg.train.mixed_precision = "fp16"
    with pytest.raises(ConfigError, match="fp16"):
        configure()
    cfg.train.channels_last = True                             # one process or DDP only
    for engine in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        with pytest.raises(ConfigError, match=f"channels_last is supported with one process or DDP, not with "
                                              f"{engine.value}"):
            Trainer.tune_denoiser(SimpleNamespace(cfg=cfg, acc=SimpleNamespace(distributed_type=engine)))
    cfg.train.channels_last, cfg.train.compile = False, True    # compile: not under ZeRO-3
    acc = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                          state=SimpleNamespace(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3)))
    with pytest.raises(ConfigError, match="compile is not supported with DeepSpeed ZeRO-3"):
        Trainer.tune_denoiser(SimpleNamespace(cfg=cfg, acc=acc))
