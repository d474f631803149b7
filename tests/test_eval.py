"""Evaluation on the tiny pipelines: fixed-seed sampling, checkpoints, reuse, win rates, report, in-training grids."""

import json
import re

import html5lib
import numpy as np
import pytest
import torch
from conftest import in_this_process
from PIL import Image

from diffalign import cli
from diffalign.config import ConfigError, LoraConfig, ModelConfig, load_config
from diffalign.eval.checkpoints import applied, resolve, resolve_all
from diffalign.eval.evaluate import summarise
from diffalign.eval.generate import generate, make_scheduler
from diffalign.models import load_model
from diffalign.models.lora import add_lora, save_lora

PROMPTS = "[a red circle, a blue square, \"a <green> & 'triangle'\"]"


def sample_args(pipeline, out, *extra):
    return [f"model.pretrained={pipeline}", f"output_dir={out}", "data.resolution=32", f"eval.prompts={PROMPTS}",
            "eval.seeds=[0, 7]", "eval.num_steps=3", "eval.guidance_scale=5.0", "eval.grid_cell=32",
            "eval.rewards=[brightness, saturation]", "eval.num_resamples=500", *extra]


@pytest.fixture(scope="module")
def checkpoints(tiny_pipelines, tmp_path_factory):
    """A LoRA with non-zero random up-projections and a perturbed full UNet, both for the tiny SD 1.5."""
    root = tmp_path_factory.mktemp("ckpts")
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))
    gen = torch.Generator().manual_seed(0)
    params = add_lora(model.denoiser, LoraConfig(rank=4))
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    (root / "run_lora" / "final").mkdir(parents=True)
    save_lora(model, root / "run_lora" / "final")
    (root / "run_lora" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 0.7 - 0.01 * s, "implicit_accuracy": 0.5}) + "\n" for s in (1, 2, 3)))
    full = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))
    with torch.no_grad():
        for p in full.denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    full.denoiser.save_pretrained(root / "ft" / "unet")
    full.denoiser.save_pretrained(root / "ft_sharded", max_shard_size="200KB")   # as a 10 GB SDXL UNet is saved
    return {"lora": root / "run_lora", "full": root / "ft", "sharded": root / "ft_sharded"}


@pytest.mark.parametrize(("family", "scheduler", "negative", "guidance"),
                         [("sd15", "ddim", "", 5.0), ("sd2", "dpmpp_2m", "blurry", 5.0),
                          ("sdxl", "euler_ancestral", "", 5.0), ("sdxl", "ddim", "blurry", 5.0),
                          ("sd15", "euler", "", 0.5)])          # at or below 1 the pipelines skip guidance
def test_generation_matches_the_diffusers_pipeline(family, scheduler, negative, guidance, tiny_pipelines):
    """Same seeds, scheduler and negative prompt: our images equal the pipeline's (also an ancestral sampler's)."""
    from diffusers import DiffusionPipeline

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines[family])))
    sched = make_scheduler(model, scheduler)
    prompts, seeds = ["a red circle", "a blue square"], [3, 5]
    ours = generate(model, sched, prompts, seeds, (32, 32), num_steps=4, guidance_scale=guidance,
                    negative_prompt=negative)
    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipelines[family]))
    pipe.scheduler = type(sched).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, height=32, width=32, num_inference_steps=4, guidance_scale=guidance, output_type="pt",
               generator=[torch.Generator().manual_seed(s) for s in seeds],
               negative_prompt=[negative] * 2 if negative else None).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_sdxl_unconditional_branch_follows_the_pipelines_force_zeros_flag(tiny_pipelines, tmp_path):
    """A pipeline saved with force_zeros_for_empty_prompt false encodes the empty prompt; so do we."""
    import shutil

    from diffusers import DiffusionPipeline

    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_pipelines["sdxl"], folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    model = load_model(ModelConfig(pretrained=str(folder)))
    zeros = load_model(ModelConfig(pretrained=str(tiny_pipelines["sdxl"])))
    assert not model.force_zeros_for_empty_prompt and zeros.force_zeros_for_empty_prompt
    assert model.null_cond(1, (32, 32)).hidden.abs().sum() > 0 and zeros.null_cond(1, (32, 32)).hidden.abs().sum() == 0
    sched = make_scheduler(model, "ddim")
    ours = generate(model, sched, ["a red circle"], [3], (32, 32), num_steps=3, guidance_scale=5.0)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.scheduler = type(sched).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a red circle"], height=32, width=32, num_inference_steps=3, guidance_scale=5.0, output_type="pt",
               generator=[torch.Generator().manual_seed(3)]).images
    torch.testing.assert_close(ours, ref.float(), atol=1e-5, rtol=0)


def test_every_configurable_scheduler_samples(tiny_pipelines):
    from diffalign.config import SCHEDULERS
    from diffalign.eval.generate import SCHEDULER_CLASSES

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd2"])))
    for name in SCHEDULERS:
        sched = make_scheduler(model, name)
        assert type(sched).__name__ == SCHEDULER_CLASSES.get(name, "DDIMScheduler")   # the tiny pipeline's own
        images = generate(model, sched, ["a red circle"], [0], (32, 32), 4, 5.0)   # PNDM's PRK needs >= 4 steps
        assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all(), name


def test_an_image_does_not_depend_on_its_batch(tiny_pipelines):
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))
    sched = make_scheduler(model, "euler_ancestral")
    both = generate(model, sched, ["a", "b"], [1, 2], (32, 32), 3, 5.0)
    alone = generate(model, sched, ["b"], [2], (32, 32), 3, 5.0)
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(both[0], both[1])


def read_metadata(out):
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_sample_cli_same_seed_gives_identical_base_images_and_full_metadata(tiny_pipelines, checkpoints, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["sample", "configs/tiny_dpo_sd15.yaml",
                     *sample_args(tiny_pipelines["sd15"], a, f"eval.checkpoints=[{checkpoints['lora']}]")]) == 0
    assert cli.main(["sample", "configs/tiny_dpo_sd15.yaml",
                     *sample_args(tiny_pipelines["sd15"], b)]) == 0
    rows_a, rows_b = read_metadata(a), read_metadata(b)
    assert len(rows_a) == 2 * 3 * 2 and len(rows_b) == 3 * 2           # models x prompts x seeds
    assert {"prompt", "seed", "checkpoint", "path", "guidance_scale", "num_steps", "scheduler"} <= set(rows_a[0])
    assert {r["checkpoint"] for r in rows_a} == {"base", "run_lora/final"}
    assert {(r["prompt"], r["seed"]) for r in rows_b} == {(p, s) for p in ("a red circle", "a blue square",
                                                                          "a <green> & 'triangle'") for s in (0, 7)}
    base_a = {(r["prompt_index"], r["seed"]): r["path"] for r in rows_a if r["checkpoint"] == "base"}
    for r in rows_b:                      # another run, without the checkpoint: byte-identical base images
        assert open(r["path"], "rb").read() == open(base_a[(r["prompt_index"], r["seed"])], "rb").read()
    tuned = [r for r in rows_a if r["checkpoint"] != "base"]
    differs = [np.abs(np.asarray(Image.open(r["path"]), dtype=int) -
                      np.asarray(Image.open(base_a[(r["prompt_index"], r["seed"])]), dtype=int)).max() for r in tuned]
    assert min(differs) > 0                                                # the LoRA changes every image
    seeds = {s: Image.open(base_a[(0, s)]) for s in (0, 7)}
    assert np.asarray(seeds[0]).shape == (32, 32, 3) and seeds[0].tobytes() != seeds[7].tobytes()


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_a_checkpoint_is_applied_inside_the_block_and_removed_after(kind, tiny_pipelines, checkpoints):
    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))
    sched = make_scheduler(model, "ddim")
    ckpt = resolve(str(checkpoints[kind]), "eval.checkpoints[0]")
    assert ckpt.kind == kind

    def images():
        return generate(model, sched, ["a red circle"], [0], (32, 32), 3, 5.0)

    before = images()
    with applied(model, ckpt):
        tuned = images()
    assert (tuned - before).abs().max() > 1e-3
    torch.testing.assert_close(images(), before, atol=0, rtol=0)
    if kind == "full":                  # the same weights saved in shards (with an index) load alike
        sharded = resolve(str(checkpoints["sharded"]), "eval.checkpoints[0]")
        assert len(sharded.weights) > 2 and sharded.fingerprint()["files"].keys() != ckpt.fingerprint()["files"].keys()
        with applied(model, sharded):
            torch.testing.assert_close(images(), tuned, atol=0, rtol=0)


def test_lora_files_with_bare_keys_load_and_foreign_keys_are_an_error(tiny_pipelines, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    model = load_model(ModelConfig(pretrained=str(tiny_pipelines["sd15"])))
    sched = make_scheduler(model, "ddim")
    state = load_file(checkpoints["lora"] / "final" / "pytorch_lora_weights.safetensors")
    for name, keys in (("bare", {k.removeprefix("unet."): v for k, v in state.items()}),
                       ("text", {k.replace("unet.", "text_encoder."): v for k, v in state.items()}),
                       ("junk", {"foo.weight": torch.zeros(2)})):
        (tmp_path / name).mkdir()
        save_file(keys, tmp_path / name / "pytorch_lora_weights.safetensors")
    with applied(model, resolve(str(checkpoints["lora"]), "c")):
        prefixed = generate(model, sched, ["a red circle"], [0], (32, 32), 3, 5.0)
    with applied(model, resolve(str(tmp_path / "bare"), "c")):      # saved by unet.save_lora_adapter
        torch.testing.assert_close(generate(model, sched, ["a red circle"], [0], (32, 32), 3, 5.0), prefixed,
                                   atol=0, rtol=0)
    for name in ("text", "junk"):                                    # never a silent run of the base model
        with pytest.raises(ConfigError, match="match no layer of the UNet2DConditionModel"):
            with applied(model, resolve(str(tmp_path / name), "c")):
                pass
        assert not getattr(model.denoiser, "peft_config", {})


def test_labels_that_would_share_a_samples_folder_are_refused(tmp_path):
    from diffalign.eval.sample import sample_folders

    assert len(set(sample_folders(tmp_path, ["base", "run/final", "run/checkpoint-2"]).values())) == 3
    with pytest.raises(ConfigError, match="would share the folder"):
        sample_folders(tmp_path, ["base", "lr 1e-4", "lr_1e-4"])
    with pytest.raises(ConfigError, match="would share the folder"):
        sample_folders(tmp_path, ["base", "Base!"])


def test_samples_are_reused_until_settings_or_weights_change(tiny_pipelines, checkpoints, tmp_path, monkeypatch):
    args = sample_args(tiny_pipelines["sd15"], tmp_path, f"eval.checkpoints=[{checkpoints['lora']}]")
    cfg = ["sample", "configs/tiny_dpo_sd15.yaml", *args]
    assert cli.main(cfg) == 0
    base = sorted((tmp_path / "samples" / "base").glob("*.png"))
    lora = sorted((tmp_path / "samples" / "run_lora_final").glob("*.png"))
    stamp = {p: p.stat().st_mtime_ns for p in base + lora}
    import diffalign.models

    with monkeypatch.context() as patch:                                       # nothing to do: no model is loaded
        patch.setattr(diffalign.models, "load_model", lambda *a, **k: pytest.fail("loaded a model for nothing"))
        assert cli.main(cfg) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())             # nothing regenerated
    weights = checkpoints["lora"] / "final" / "pytorch_lora_weights.safetensors"
    weights.touch()                                                             # "retrained": new mtime
    assert cli.main(cfg) == 0
    assert all(p.stat().st_mtime_ns == stamp[p] for p in base)
    assert all(p.stat().st_mtime_ns != stamp[p] for p in lora)
    assert cli.main([*cfg, "eval.guidance_scale=3.0"]) == 0                     # other settings: all redone
    assert all(p.stat().st_mtime_ns != stamp[p] for p in base)
    stamp = {p: p.stat().st_mtime_ns for p in base}
    assert cli.main([*cfg, "eval.guidance_scale=3.0", "model.vae_dtype=bfloat16"]) == 0   # model settings count
    assert all(p.stat().st_mtime_ns != stamp[p] for p in base)
    (tmp_path / "samples" / "base" / "settings.json").write_text("{not json")  # damaged stamp: redo, no crash
    assert cli.main([*cfg, "eval.guidance_scale=3.0", "model.vae_dtype=bfloat16"]) == 0


def test_eval_cli_writes_results_grids_and_a_valid_report(tiny_pipelines, checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    entries = f"[{checkpoints['lora']}, {{name: full <ft>, path: {checkpoints['full']}}}]"
    assert cli.main(["eval", "configs/tiny_dpo_sd15.yaml",
                     *sample_args(tiny_pipelines["sd15"], out, f"eval.checkpoints={entries}")]) == 0
    assert "run_lora/final" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["models"]) == {"base", "run_lora/final", "full <ft>"}
    rows = results["comparisons"]
    assert [(r["checkpoint"], r["reward"]) for r in rows] == [
        ("run_lora/final", "brightness"), ("run_lora/final", "saturation"),
        ("full <ft>", "brightness"), ("full <ft>", "saturation")]
    assert results["checkpoints"]["full <ft>"]["saturation"]["win_rate"] == rows[3]["win_rate"]
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 3 * 3 * 2
    for r in rows:
        assert r["n"] == 6 and r["wins"] + r["losses"] + r["ties"] == 6
        assert r["win_rate"] == pytest.approx((r["wins"] + 0.5 * r["ties"]) / 6)
        assert r["win_rate_ci"][0] <= r["win_rate"] <= r["win_rate_ci"][1]
        tuned = [s[r["reward"]] for s in scores if s["checkpoint"] == r["checkpoint"]]
        assert r["mean"] == pytest.approx(np.mean(tuned))
    grid = Image.open(out / "grids" / "grid_000.png")
    assert grid.size == (32 * (1 + 3), 24 + 32 * 6)            # label column + 3 models; header + 6 rows
    text = (out / "report.html").read_text()
    html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)   # raises on any parse error
    assert "full &lt;ft&gt;" in text and "full <ft>" not in text
    assert "Training curves" in text and "No training logs were found" not in text   # run_lora's metrics.jsonl


def test_a_non_finite_score_names_the_reward_and_the_image(tmp_path):
    from diffalign.eval.evaluate import score_records
    from diffalign.rewards.base import Reward

    class Broken(Reward):
        name = "broken"

        def score(self, images, prompts):
            return torch.tensor([0.5, float("nan")])

    records = []
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        records.append({"checkpoint": "base", "prompt": "p", "path": str(tmp_path / f"{i}.png")})
    with pytest.raises(ValueError, match=r"gave nan for .*1\.png \(base\)"):
        score_records(records, [Broken()], 2, tmp_path)


def record(checkpoint, prompt_index, seed):
    return {"checkpoint": checkpoint, "prompt_index": prompt_index, "seed": seed}


@pytest.mark.parametrize(("delta", "expected"), [(1.0, 1.0), (-1.0, 0.0), (0.0, 0.5)])
def test_summarise_pairs_images_by_prompt_and_seed(delta, expected):
    """Base and tuned rows in different orders: each tuned score is compared with its own base image."""
    keys = [(p, s) for p in range(4) for s in (0, 1)]
    base = {k: float(10 * k[0] + k[1]) for k in keys}
    shuffled = keys[::-1]
    records = [record("base", *k) for k in keys] + [record("tuned", *k) for k in shuffled]
    scores = {"r": [base[k] for k in keys] + [base[k] + delta for k in shuffled]}
    cfg = load_config(None, ["eval.num_resamples=200", "eval.seeds=[0, 1]"])
    (row,) = summarise(records, scores, cfg)["comparisons"]
    assert row["win_rate"] == expected and row["win_rate_ci"] == [expected, expected]
    assert row["n"] == 8 and row["mean"] == pytest.approx(np.mean(list(base.values())) + delta)
    assert row["mean_diff"] == pytest.approx(delta) and row["mean_diff_ci"] == pytest.approx([delta, delta])


def test_checkpoint_and_reward_errors_name_the_key(tiny_pipelines, checkpoints, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"eval.checkpoints\[1\].*no weights found"):
        resolve_all([str(checkpoints["lora"]), str(tmp_path)], tmp_path)
    with pytest.raises(ConfigError, match="not unique"):
        resolve_all([str(checkpoints["lora"]), str(checkpoints["lora"] / "final")], tmp_path)
    with pytest.raises(ConfigError, match="path"):
        resolve({"name": "x"}, "eval.checkpoints[0]")
    assert resolve_all([], checkpoints["lora"])[0].label == "run_lora/final"   # a run's own final/
    code = cli.main(["sample", "configs/tiny_dpo_sd15.yaml", *sample_args(tiny_pipelines["sd15"], tmp_path / "x"),
                     "eval.base=false"])
    assert code == 2
    for bad, message in (("[brightnes]", r"eval.rewards\[0\]`: unknown reward 'brightnes'"),
                         ("[brightness, {name: clip_score, colour: 1}]", r"eval.rewards\[1\]`.*unknown option")):
        code = cli.main(["eval", "configs/tiny_dpo_sd15.yaml", *sample_args(tiny_pipelines["sd15"], tmp_path / "y"),
                         f"eval.rewards={bad}"])
        assert code == 2 and not (tmp_path / "y").exists()       # refused before any image was made
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(ConfigError, match="eval.eta"):
        load_config(None, ["eval.scheduler=euler", "eval.eta=1.0"])
    with pytest.raises(ConfigError, match="eval.seeds"):
        load_config(None, ["eval.seeds=[1, 1]"])


def test_two_processes_share_the_sampling_and_make_the_same_images(tiny_pipelines, checkpoints, tmp_path):
    import os
    import subprocess
    import sys

    def args(out):
        return sample_args(tiny_pipelines["sd15"], out, f"eval.checkpoints=[{checkpoints['lora']}]",
                           "eval.batch_size=2")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}      # as torchrun sets it: same float reductions in both runs
    in_this_process(["sample", "configs/tiny_dpo_sd15.yaml", *args(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffalign.cli", "eval",
           "configs/tiny_dpo_sd15.yaml", *args(tmp_path / "two")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 models x 3 batches of 2 images, dealt round-robin: process 0 makes 8 images, process 1 makes 4
    assert "process 0 of 2 made 8 images" in done.stderr and "process 1 of 2 made 4 images" in done.stderr
    one, two = read_metadata(tmp_path / "one"), read_metadata(tmp_path / "two")
    assert len(two) == len(one) == 12
    for a, b in zip(one, two, strict=True):
        assert {k: v for k, v in a.items() if k != "path"} == {k: v for k, v in b.items() if k != "path"}
        assert open(a["path"], "rb").read() == open(b["path"], "rb").read()
    assert done.stdout.count("win rate") == 1 and (tmp_path / "two" / "report.html").is_file()


def test_in_training_evaluation_logs_a_progress_grid_and_leaves_training_unchanged(tiny_pipelines, tmp_path):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from diffalign.data.toy import write_toy_pairs

    toy = write_toy_pairs(tmp_path / "toy", num_pairs=8, size=32)
    common = ["train.max_steps=4", "train.batch_size=2", "data.resolution=32", "data.num_workers=0",
              f"data.path={toy}", f"model.pretrained={tiny_pipelines['sdxl']}", "train.checkpoint_every=0"]
    watched = [*common, f"output_dir={tmp_path / 'with'}", "eval.every=2", "eval.every_prompts=2",
               "eval.num_steps=2", "eval.grid_cell=32", "train.report_to=tensorboard"]
    stale = tmp_path / "with" / "eval" / "step-000001"          # left by an earlier run with other prompts
    stale.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (32, 32)).save(stale / f"{i}.png")
    (stale / "settings.json").write_text(json.dumps({"prompts": ["other", "prompts"]}))
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *watched]) == 0
    assert cli.main(["train", "configs/tiny_dpo_sdxl.yaml", *common, f"output_dir={tmp_path / 'without'}"]) == 0
    folder = tmp_path / "with" / "eval"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-000000", "step-000001", "step-000002",
                                                             "step-000004"]
    assert Image.open(folder / "progress.png").size == (32 * (1 + 3), 24 + 32 * 2)   # steps 0, 2, 4: not the stale 1
    events = EventAccumulator(str(tmp_path / "with" / "tiny_dpo_sdxl"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("eval/progress")] == [0, 2, 4]
    final = {n: load_file(tmp_path / d / "final" / "pytorch_lora_weights.safetensors") for n, d in
             (("with", "with"), ("without", "without"))}
    for key, value in final["without"].items():         # sampling does not disturb the training RNG
        torch.testing.assert_close(final["with"][key], value, atol=0, rtol=0)
