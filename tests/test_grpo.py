"""GRPO's training loop: rollouts reused for several updates, advantages (group, batch std, DDPO's per-prompt
statistics), layout-independent noise, prompt metadata for rewards, and the same advantages on 2 processes."""

import json
import subprocess
import sys

import pytest
import torch

from diffalign import cli
from diffalign.data.pairs import DataError
from diffalign.methods.grpo import PromptStats
from diffalign.sampling import GroupNoise

TINY = "configs/tiny_grpo_sd15.yaml"


def test_prompt_stats_follow_ddpos_tracker_by_hand():
    stats = PromptStats(buffer_size=2, min_count=2)
    adv = stats.advantages(torch.tensor([1, 1, 2]), torch.tensor([1.0, 3.0, 5.0]))
    # prompt 1 has 2 rewards: its own mean 2, std 1; prompt 2 has 1 < min_count: the batch's mean 3, std sqrt(8/3)
    expected = torch.tensor([-1 / (1 + 1e-6), 1 / (1 + 1e-6), 2 / ((8 / 3) ** 0.5 + 1e-6)])
    torch.testing.assert_close(adv, expected)
    adv = stats.advantages(torch.tensor([2, 1]), torch.tensor([1.0, 7.0]))
    # prompt 2 now holds [5, 1]: mean 3, std 2; prompt 1 keeps only its last 2 rewards, [3, 7]: mean 5, std 2
    torch.testing.assert_close(adv, torch.tensor([2 / (2 + 1e-6), -2 / (2 + 1e-6)]).flip(0))
    restored = PromptStats(2, 2)
    restored.load_state_dict(stats.state_dict())
    assert {k: list(v) for k, v in restored.seen.items()} == {1: [3.0, 7.0], 2: [5.0, 1.0]}


def test_group_noise_does_not_depend_on_the_batch_a_group_is_in():
    shape = (6, 4, 2, 2)                                             # 3 groups of 2
    together = GroupNoise([11, 12, 13], 2, "cpu").randn(shape)
    alone = GroupNoise([12], 2, "cpu").randn((2, 4, 2, 2))
    assert torch.equal(together[2:4], alone)
    shared = GroupNoise([11, 12, 13], 2, "cpu").randn(shape, shared=True)
    assert torch.equal(shared[0], shared[1]) and not torch.equal(shared[1], shared[2])
    with pytest.raises(ValueError, match="not 3 groups of 2"):
        GroupNoise([11, 12, 13], 2, "cpu").randn((5, 4, 2, 2))


def test_rewards_read_the_prompts_metadata_and_report_extra_info(tmp_path):
    from diffalign.data.prompts import PromptDataset, read_prompt_records
    from diffalign.rewards import build_reward

    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 0.9                                                  # a red image
    reward = build_reward("prompt_colour_match")
    assert reward(red, ["a ball"], [{"colour": "red"}]).item() == 1.0       # the metadata names the colour
    assert reward(red, ["a blue ball"], [{"colour": "red"}]).item() == 1.0  # and wins over the prompt's words
    assert reward(red, ["a blue ball"]).item() == 0.0                       # without it, the prompt's colour
    scores, info = reward.details(red, ["a red ball"])
    assert scores.item() == 1.0 and info["colour_distance"].shape == (1,)
    with pytest.raises(ValueError, match="metadata colour 'teal'"):
        reward(red, ["a ball"], [{"colour": "teal"}])
    with pytest.raises(ValueError, match="list of 1 dicts"):
        reward(red, ["a ball"], [{}, {}])
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a ball", "colour": "red"}\n\n{"prompt": "a cube", "count": 2}\n')
    assert read_prompt_records(str(path)) == (["a ball", "a cube"], [{"colour": "red"}, {"count": 2}])
    batch = PromptDataset(str(path), 32).collate([(1, "a cube")])
    assert batch["metadata"] == [{"count": 2}]
    path.write_text('{"prompt": "a ball"}\n{"caption": "a cube"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: .*\"prompt\""):
        read_prompt_records(str(path))
    path.write_text('{"prompt": "a ball"}\nnot json\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:2: not valid JSON"):
        read_prompt_records(str(path))


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_several_updates_per_rollout_reuse_it_and_see_the_clip(tiny_pipelines, tmp_path):
    """updates_per_rollout=2: steps 1 and 2 train on one rollout batch (same rewards), step 3 samples anew; the
    first update has ratio 1, the second sees the moved policy (ratio != 1, some steps clipped)."""
    out = tmp_path / "run"
    assert cli.main(["train", TINY, f"model.pretrained={tiny_pipelines['sd15']}", f"output_dir={out}",
                     "method.updates_per_rollout=2", "method.num_steps=3", "method.clip_range=1e-6",
                     "train.max_steps=3", "train.checkpoint_every=0"]) == 0
    rows = _rows(out)
    assert rows[0]["reward"] == rows[1]["reward"] != rows[2]["reward"]
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and rows[0]["clip_fraction"] == 0
    assert rows[1]["ratio"] != pytest.approx(1.0, abs=1e-6) and rows[1]["clip_fraction"] > 0
    assert rows[2]["ratio"] == pytest.approx(1.0, abs=1e-6)


def test_minibatches_sample_every_share_before_the_first_update(tiny_pipelines, tmp_path):
    """minibatches=2, updates_per_rollout=2: one rollout phase for steps 1-4, each step on one half (1 and 3 on the
    first, 2 and 4 on the second); step 2's half was sampled before step 1 moved the policy, so its ratio departs
    from 1 (ddpo-pytorch's off-policy minibatches); step 5 samples anew."""
    out = tmp_path / "run"
    assert cli.main(["train", TINY, f"model.pretrained={tiny_pipelines['sd15']}", f"output_dir={out}",
                     "method.minibatches=2", "method.updates_per_rollout=2", "method.num_steps=3",
                     "train.max_steps=5", "train.checkpoint_every=0"]) == 0
    rows = _rows(out)
    assert rows[0]["reward"] == rows[2]["reward"] and rows[1]["reward"] == rows[3]["reward"]
    assert rows[0]["reward"] != rows[1]["reward"] and rows[4]["reward"] not in {rows[0]["reward"], rows[1]["reward"]}
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-6) and rows[4]["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert all(rows[i]["ratio"] != pytest.approx(1.0, abs=1e-6) for i in (1, 2, 3))


def test_resume_inside_a_rollout_cycle_is_exact(tiny_pipelines, tmp_path):
    """A checkpoint between two updates of one rollout phase holds its rollouts (both minibatches): 3 + 1 steps
    == 4 steps, bit for bit, and DDPO's per-prompt statistics travel with it."""
    from safetensors.torch import load_file

    common = [TINY, f"model.pretrained={tiny_pipelines['sd15']}", "method.updates_per_rollout=2",
              "method.minibatches=2", "method.num_steps=3", "method.advantages=per_prompt", "method.stat_min_count=3",
              "train.checkpoint_every=3"]
    a, b = tmp_path / "a", tmp_path / "b"             # a cycle is 4 steps: the checkpoint falls inside it
    assert cli.main(["train", *common, f"output_dir={a}", "train.max_steps=4"]) == 0
    assert cli.main(["train", *common, f"output_dir={b}", "train.max_steps=3"]) == 0
    saved = torch.load(b / "checkpoint-3" / "rng_0.pt", weights_only=True)
    assert len(saved["held"]) == 2 and "rollout" in saved["held"][1] and saved["method"]["prompt_stats"]
    assert cli.main(["train", *common, f"output_dir={b}", "train.max_steps=4", "train.resume=latest"]) == 0
    wa = load_file(a / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(b / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert _rows(a)[-1]["reward"] == _rows(b)[-1]["reward"]


RANK_SCRIPT = """
import sys
import torch
from diffalign.config import load_config
from diffalign.trainer import Trainer

out, pipeline, batch_size = sys.argv[1], sys.argv[2], sys.argv[3]
cfg = load_config("configs/tiny_grpo_sd15.yaml", [f"model.pretrained={pipeline}", f"output_dir={out}/run",
                  f"train.batch_size={batch_size}", "method.num_steps=2", "method.reward=prompt_colour",
                  "train.process_timeout_s=123"])
trainer = Trainer(cfg)
assert trainer.acc.init_handler.timeout.total_seconds() == 123         # the process group's timeout
results = {}
for mode in ("group", "group_batch_std", "per_prompt"):
    trainer.method.advantages = mode
    batch = trainer.next_batch(trainer.batches())
    results[mode] = {k: batch["rollout"][k] for k in ("advantages", "rewards", "latents")}
    results[mode]["seeds"] = batch["seeds"]
torch.save(results, f"{out}/rank{trainer.acc.process_index}_of_{trainer.acc.num_processes}.pt")
"""


def test_two_processes_compute_the_advantages_of_one_process_on_the_same_global_batch(tiny_pipelines, tmp_path):
    """torchrun, 2 gloo processes x 2 prompts against 1 process x 4 prompts: the same prompts, the same rollouts
    (noise seeded per example) and the same advantages, including the two modes that need the global batch."""
    (tmp_path / "ranks.py").write_text(RANK_SCRIPT)
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(tmp_path / "ranks.py"),
           str(tmp_path), str(tiny_pipelines["sd15"]), "2"]
    one = [sys.executable, str(tmp_path / "ranks.py"), str(tmp_path), str(tiny_pipelines["sd15"]), "4"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    for cmd in (two, one):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}_of_2.pt", weights_only=True) for r in (0, 1)]
    single = torch.load(tmp_path / "rank0_of_1.pt", weights_only=True)
    for mode, alone in single.items():
        joined = {k: torch.cat([r[mode][k] for r in ranks], dim=1 if k == "latents" else 0) for k in alone}
        assert torch.equal(joined["seeds"], alone["seeds"])                  # the same global batch, in order
        torch.testing.assert_close(joined["latents"], alone["latents"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined["rewards"], alone["rewards"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joined["advantages"], alone["advantages"], atol=1e-4, rtol=1e-4)
    mine = ranks[0]["group_batch_std"]                                      # the global std, not rank 0's own
    grouped = mine["rewards"].view(-1, 2)
    own_std = (grouped - grouped.mean(1, keepdim=True)) / (mine["rewards"].std(unbiased=False) + 1e-4)
    assert not torch.allclose(own_std.flatten(), mine["advantages"], atol=1e-4)
