"""Runs that cannot mix, hang or resume into the wrong thing: one test per fault found by attacking the CLI."""

import json
import logging
import shutil

import pytest
import torch
from conftest import poison_loss
from safetensors.torch import load_file

from diffalign import checkpoint as ckpt
from diffalign import cli
from diffalign.config import ConfigError, load_config
from diffalign.data.toy import write_toy_pairs
from diffalign.trainer import Trainer

BASE = ["train.batch_size=2", "train.lr=1e-3", "train.log_every=1", "train.report_to=none", "data.resolution=64",
        "data.num_workers=0", "lora.rank=4"]
CONFIG = "configs/tiny_dpo_sd15.yaml"


@pytest.fixture()
def toy(tmp_path):
    return write_toy_pairs(tmp_path / "toy", num_pairs=8, size=64)


def run(tiny_pipelines, data, out, *extra):
    args = [f"model.pretrained={tiny_pipelines['sd15']}", f"data.path={data}", f"output_dir={out}", *BASE, *extra]
    return cli.main(["train", CONFIG, *args])


def lora(folder):
    return load_file(folder / "pytorch_lora_weights.safetensors")


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def steps_logged(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- 1: mixing runs


def test_a_fresh_run_refuses_a_folder_holding_another_run(tiny_pipelines, toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.checkpoint_every=2") == 0
    capsys.readouterr()
    assert run(tiny_pipelines, toy, out, "train.max_steps=2", "train.checkpoint_every=1") == 2
    err = capsys.readouterr().err
    assert f"output_dir={out} already holds a run" in err
    assert "train.resume=latest" in err and "train.overwrite=true" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]   # untouched
    assert steps_logged(out) == [1, 2, 3, 4]

    assert run(tiny_pipelines, toy, out, "train.max_steps=2", "train.checkpoint_every=1",
               "train.overwrite=true") == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert steps_logged(out) == [1, 2]


def test_output_dir_that_is_a_file_is_one_line(tiny_pipelines, toy, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(tiny_pipelines, toy, tmp_path / "file", "train.max_steps=1") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- 2 and 5: skipped pairs


def break_images(pairs_jsonl, lines):
    records = pairs_jsonl.read_text().splitlines()
    for i in lines:
        (pairs_jsonl.parent / json.loads(records[i])["rejected"]).write_bytes(b"not a png")


def test_every_pair_unreadable_stops_instead_of_spinning(tiny_pipelines, toy, tmp_path, capsys):
    break_images(toy, range(8))
    code = run(tiny_pipelines, toy, tmp_path / "run", "train.max_steps=2", "data.on_bad_image=skip_pair")
    assert code == 2
    err = capsys.readouterr().err
    assert "unreadable, more than data.max_skip_fraction" in err


def test_resume_is_exact_when_a_whole_micro_batch_is_skipped(tiny_pipelines, toy, tmp_path):
    break_images(toy, [3])
    skip = ["data.on_bad_image=skip_pair", "data.max_skip_fraction=0.5", "train.batch_size=1",
            "train.checkpoint_every=4"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(tiny_pipelines, toy, a, *skip, "train.max_steps=8") == 0
    assert run(tiny_pipelines, toy, b, *skip, "train.max_steps=4") == 0
    assert run(tiny_pipelines, toy, b, *skip, "train.max_steps=8", "train.resume=latest") == 0
    assert same(lora(a / "final"), lora(b / "final"))
    logged = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_pairs"] == 1      # the bad pair, met once in 8 steps of 8 pairs


# ------------------------------------------------------------------------------------------- 3: config changes


def test_resume_refuses_what_would_change_the_checkpoint(tiny_pipelines, toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_pipelines, toy, out, "train.max_steps=2", "train.checkpoint_every=2") == 0
    capsys.readouterr()
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.resume=latest", "lora.rank=8",
               "method.name=mapo", "method.beta=0.1") == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "lora.rank: checkpoint has 4, config has 8" in err
    assert "method.name: checkpoint has 'dpo', config has 'mapo'" in err

    state = out / "checkpoint-2" / "trainer_state.json"
    saved = json.loads(state.read_text())
    state.write_text(json.dumps({**saved, "num_processes": 2}))
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.resume=latest") == 2
    assert "num_processes: checkpoint has 2, config has 1" in capsys.readouterr().err


def test_resume_applies_a_new_lr_and_schedule_length(tiny_pipelines, toy, tmp_path, caplog):
    out = tmp_path / "run"
    cosine = ["train.lr_scheduler=cosine", "train.checkpoint_every=2"]
    assert run(tiny_pipelines, toy, out, *cosine, "train.max_steps=4") == 0
    # stop after step 2, then continue with a longer schedule and a new peak lr
    shutil.rmtree(out / "final")
    ckpt.remove_tree(out / "checkpoint-4")
    args = [f"model.pretrained={tiny_pipelines['sd15']}", f"data.path={toy}", f"output_dir={out}", *BASE, *cosine,
            "train.max_steps=10", "train.lr=5e-4", "train.resume=latest"]
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        trainer = Trainer(load_config(CONFIG, args))
        trainer.resume()
    assert "train.lr: checkpoint has 0.001, config has 0.0005" in caplog.text
    assert "train.max_steps: checkpoint has 4, config has 10" in caplog.text
    import math

    expected = 5e-4 * 0.5 * (1 + math.cos(math.pi * 2 / 10))     # cosine of the NEW length at step 2
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(expected, rel=1e-6)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------- 4: damaged checkpoints


@pytest.mark.parametrize("victim", ["optimizer.pt", "pytorch_lora_weights.safetensors"])
def test_a_damaged_newest_checkpoint_falls_back_and_is_named(victim, tiny_pipelines, toy, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.checkpoint_every=2") == 0
    shutil.rmtree(out / "final")
    path = out / "checkpoint-4" / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])          # truncated
    capsys.readouterr()
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", f"train.resume={out / 'checkpoint-4'}") == 2
    assert f"{path}: " in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.resume=latest") == 0
    assert f"{path}" in caplog.text and "resuming from the previous complete checkpoint" in caplog.text


def test_overwritten_bytes_of_the_same_size_are_found(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "optimizer.pt").write_bytes(b"abcdef")
    ckpt.write_state(folder, {"step": 1})
    assert ckpt.verify(folder) == []
    (folder / "optimizer.pt").write_bytes(b"abcdeX")
    assert "CRC-32 mismatch" in ckpt.verify(folder)[0]


def test_pruning_renames_before_deleting(tmp_path, monkeypatch):
    for step in (1, 2):
        (tmp_path / f"checkpoint-{step}").mkdir()
        ckpt.write_state(tmp_path / f"checkpoint-{step}", {"step": step})

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(tmp_path, keep_last=1)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-2"]     # the half-deleted one is hidden


def test_a_crash_inside_a_checkpoint_write_leaves_the_previous_one(tiny_pipelines, toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = torch.save

    def dies_at_step_4(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            raise KeyboardInterrupt("kill -9")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_pipelines, toy, out, "train.max_steps=6", "train.checkpoint_every=2")
    monkeypatch.setattr(torch, "save", real)
    assert [p.name for p in ckpt.checkpoints(out)] == ["checkpoint-2"]
    assert run(tiny_pipelines, toy, out, "train.max_steps=6", "train.checkpoint_every=2", "train.resume=latest") == 0
    assert not list(out.glob(".tmp-*")) and steps_logged(out) == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------------------------------- 6: stale caches


def test_the_cache_notices_rewritten_pairs_and_damaged_shards(tiny_pipelines, toy, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [f"model.pretrained={tiny_pipelines['sd15']}", f"data.path={toy}", f"data.cache_dir={cache}", *BASE,
            f"output_dir={tmp_path / 'run'}", "train.max_steps=1"]
    assert cli.main(["cache", CONFIG, *args]) == 0
    lines = toy.read_text().splitlines()
    flipped = [json.dumps({**json.loads(x), "chosen": json.loads(x)["rejected"], "rejected": json.loads(x)["chosen"]})
               for x in lines[:4]]
    original = toy.read_text()
    toy.write_text("\n".join(flipped) + "\n")
    capsys.readouterr()
    assert cli.main(["train", CONFIG, *args]) == 2
    assert "the source data changed since it was built" in capsys.readouterr().err

    toy.write_text(original)
    shard = cache / "pairs-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00" * 8                      # same size, other bytes
    shard.write_bytes(bytes(data))
    assert cli.main(["train", CONFIG, *args]) == 2
    err = capsys.readouterr().err
    assert f"{shard}: damaged cache shard" in err


# ------------------------------------------------------------------------------------------- 7: ranges


@pytest.mark.parametrize("override, key", [
    ("train.keep_last=0", "train.keep_last"), ("train.max_steps=-5", "train.max_steps"),
    ("train.batch_size=0", "train.batch_size"), ("train.batch_size=-2", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.log_every=0", "train.log_every"),
    ("method.beta=-1", "method.beta"), ("train.warmup_steps=-3", "train.warmup_steps"),
    ("data.resolution=7", "data.resolution"), ("lora.rank=0", "lora.rank"), ("train.lr=0", "train.lr"),
    ("data.hflip=1.5", "data.hflip"), ("train.adam_betas=[0.9, 1.0]", "train.adam_betas"),
])
def test_numbers_out_of_range_are_refused_at_load(override, key):
    with pytest.raises(ConfigError, match=rf"`{key}` = .* (is out of range|must be)"):
        load_config(None, [override])


def test_inversion_steps_and_resolution_factor(tiny_pipelines, toy, tmp_path):
    with pytest.raises(ConfigError, match="`method.inversion_steps` = 0 is out of range"):
        load_config(None, ["method.name=inpo", "method.inversion_steps=0"])
    factor = 2 ** (len(json.loads((tiny_pipelines["sd15"] / "vae" / "config.json").read_text())
                       ["block_out_channels"]) - 1)
    bad = 8 * factor + 1
    args = [f"model.pretrained={tiny_pipelines['sd15']}", f"data.path={toy}", f"output_dir={tmp_path}", *BASE,
            f"data.resolution={bad}"]
    with pytest.raises(ConfigError, match=f"`data.resolution` = {bad} is not a multiple of the VAE's latent factor"):
        Trainer(load_config(CONFIG, args))


def test_an_empty_config_file_is_refused(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml: the config file is empty"):
        load_config(tmp_path / "empty.yaml")


# ------------------------------------------------------------------------------------------- 8: one-line errors


def test_a_missing_pipeline_folder_is_one_line(toy, tmp_path, capsys):
    code = cli.main(["train", CONFIG, f"model.pretrained={tmp_path / 'nowhere'}", f"data.path={toy}",
                     f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.pretrained=" in err and "Traceback" not in err


def test_a_bad_image_in_a_worker_prints_its_own_message(tiny_pipelines, toy, tmp_path, capsys):
    break_images(toy, [0])
    assert run(tiny_pipelines, toy, tmp_path / "run", "train.max_steps=4", "data.num_workers=1") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Caught" not in err
    line = [x[x.index("error:"):] for x in err.splitlines() if "error:" in x]
    assert len(line) == 1 and "row 0" in line[0] and "(in DataLoader worker 0)" in line[0]


def test_an_unreachable_hub_dataset_is_one_line(tmp_path, monkeypatch):
    import datasets

    from diffalign.config import DataConfig
    from diffalign.data.pairs import DataError, PreferencePairs

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/pairs' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="data.path=someone/pairs: not a local file or folder"):
        PreferencePairs(DataConfig(path="someone/pairs"))


# ------------------------------------------------------------------------------------------- 9: divergence


def test_the_divergence_message_does_not_call_the_poisoned_checkpoint_good(tiny_pipelines, toy, tmp_path,
                                                                            monkeypatch, capsys):
    poison_loss(monkeypatch, at_call=3)
    assert run(tiny_pipelines, toy, tmp_path / "run", "train.max_steps=5", "train.checkpoint_every=1") == 1
    err = capsys.readouterr().err
    assert "Last checkpoint: checkpoint-2, which holds the weights this step started from" in err
    assert "Last good checkpoint: checkpoint-1." in err


# ------------------------------------------------------------------------------------------- 10: smaller ones


def test_resume_truncates_the_metrics_of_redone_steps(tiny_pipelines, toy, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.checkpoint_every=2") == 0
    shutil.rmtree(out / "final")
    ckpt.remove_tree(out / "checkpoint-4")      # as if killed between step 4 and its checkpoint
    assert run(tiny_pipelines, toy, out, "train.max_steps=4", "train.checkpoint_every=2",
               "train.resume=latest") == 0
    assert steps_logged(out) == [1, 2, 3, 4]


def test_worker_count_is_clamped_to_the_cores_with_one_warning(caplog):
    import os

    from diffalign.trainer import _worker_count

    cores = len(os.sched_getaffinity(0))
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        assert _worker_count(cores + 6) == cores
        assert _worker_count(0) == 0
    assert caplog.text.count("exceeds the") == 1


def test_kill_9_at_random_points_then_resume_is_bit_identical(tiny_pipelines, toy, tmp_path):
    """A real SIGKILL while training and writing checkpoints every step; the resumed run ends where an
    uninterrupted one does. STEPS leaves room after the second kill point: with 12, a fast machine once finished
    the run (final/ written) within the 0.2 s before the kill."""
    STEPS = 24
    import os
    import signal
    import subprocess
    import sys
    import time

    def command(out, *extra):
        return [sys.executable, "-m", "diffalign.cli", "train", CONFIG, f"model.pretrained={tiny_pipelines['sd15']}",
                f"data.path={toy}", f"output_dir={out}", *BASE, f"train.max_steps={STEPS}", "train.checkpoint_every=1",
                *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(straight), check=True, capture_output=True, env=env, timeout=300)
    for delay in (0.05, 0.2):              # after 3 and 7 checkpoints, plus a little: inside a step or a write
        proc = subprocess.Popen(command(killed, "train.resume=latest"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        wanted, deadline = (3 if delay < 0.1 else 7), time.time() + 240
        while time.time() < deadline and proc.poll() is None and not (killed / f"checkpoint-{wanted}").is_dir():
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL           # killed mid-run, not finished
        assert not (killed / "final").exists()
    subprocess.run(command(killed, "train.resume=latest"), check=True, capture_output=True, env=env, timeout=300)
    assert same(lora(straight / "final"), lora(killed / "final"))
    assert steps_logged(killed) == list(range(1, STEPS + 1))
    assert not [p for p in killed.iterdir() if p.name.startswith((".tmp-", ".del-", ".old-"))]
