"""Shared fixtures: tiny pipelines built once per session (offline), and offline hub settings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory):
    """diffalign's own cache (tar shard indexes) in the session's tmp folder, for this process and the processes
    the tests launch, never in ~/.cache."""
    os.environ["DIFFALIGN_CACHE"] = str(tmp_path_factory.mktemp("diffalign_cache"))


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory):
    """{family: path} of tiny random-weight pipelines saved with save_pretrained."""
    from diffalign.models.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("pipelines")
    return {fam: build_tiny_pipeline(fam, root / fam) for fam in ("sd15", "sd2", "sdxl", "sd3", "flux")}


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory):
    """8 toy pairs at 64 px, shared by the multi-process tests (and their one-process references)."""
    from diffalign.data.toy import write_toy_pairs

    return write_toy_pairs(tmp_path_factory.mktemp("toy_pairs"), num_pairs=8, size=64)


def in_this_process(args: list[str]) -> None:
    """``diffalign <args>`` as one process, run here: what a one-process launch does, without its process start
    (about 6 s of imports); one intra-op thread, as torchrun sets for the processes it is compared with."""
    import torch

    from diffalign import cli

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def poison_loss(monkeypatch: pytest.MonkeyPatch, at_call: int) -> None:
    """Make Diffusion-DPO's loss non-finite on its `at_call`-th call (1-based), to exercise the NaN guard."""
    from diffalign.methods.dpo import DiffusionDPO

    calls = {"n": 0}
    original = DiffusionDPO.loss

    def poisoned(self, model, batch):
        calls["n"] += 1
        loss, metrics = original(self, model, batch)
        return (loss * float("nan"), metrics) if calls["n"] == at_call else (loss, metrics)

    monkeypatch.setattr(DiffusionDPO, "loss", poisoned)


@pytest.fixture
def compile_graphs():
    """A torch.compile backend named "diffalign_recording" (a string, so a config can name it): AOT autograd's
    eager backend, the graphs inductor would get, without code generation; yields the list of the graphs it
    compiled during the test. dynamo's caches are reset before and after."""
    import torch
    from torch._dynamo.backends.registry import list_backends, lookup_backend, register_backend

    graphs: list = []
    _RECORDED[:] = [graphs]
    if "diffalign_recording" not in list_backends(exclude_tags=()):
        @register_backend(name="diffalign_recording")
        def _recording(gm, example_inputs):
            _RECORDED[0].append(gm)
            return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


_RECORDED: list = [[]]      # the running test's graph list (the backend is registered once per session)
