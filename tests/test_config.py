"""Strict config loading, overrides and the shipped configs."""

from pathlib import Path

import pytest

from diffalign.config import ConfigError, describe_options, load_config
from diffalign.methods import METHODS

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.lr=3e-5", "data.resolution=512", "method.beta=2000", "lora.alpha=null",
                             "name=x"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.resolution == 512 and cfg.method.beta == 2000.0
    assert cfg.output_dir == "runs/x"
    assert cfg.method.name == "dpo" and cfg.data.caption_dropout == 0.0 and cfg.data.ties == "drop"


def test_unknown_key_suggests_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key `train.max_step`; did you mean `max_steps`"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown key `dat`; did you mean `data`"):
        load_config(None, ["dat.path=x"])


def test_wrong_types_and_choices():
    with pytest.raises(ConfigError, match="`train.max_steps` = 'many' should be int"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="`train.gradient_checkpointing` = 'yes please' should be bool"):
        load_config(None, ["train.gradient_checkpointing=yes please"])
    with pytest.raises(ConfigError, match="not one of center, random; did you mean `center`"):
        load_config(None, ["data.crop=centre"])
    with pytest.raises(ConfigError, match="cannot be null"):
        load_config(None, ["train.lr=null"])
    with pytest.raises(ConfigError, match="unknown method.name 'ppo'"):
        load_config(None, ["method.name=ppo"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["train.lr"])


def test_yaml_no_is_the_mixed_precision_choice_not_false(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")            # YAML 1.1 reads a bare `no` as false
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="should be str"):
        load_config(None, ["data.crop=false"])


def test_method_specific_keys_follow_method_name():
    cfg = load_config(None, ["method.name=inpo", "method.inversion_steps=20", "method.inversion_model=reference"])
    assert (cfg.method.inversion_steps, cfg.method.inversion_model, cfg.method.beta) == (20, "reference", 5000.0)
    assert load_config(None, ["method.name=mapo"]).method.beta == 0.1
    with pytest.raises(ConfigError, match="inversion_steps"):
        load_config(None, ["method.name=mapo", "method.inversion_steps=20"])
    with pytest.raises(ConfigError, match="not one of policy, reference"):
        load_config(None, ["method.name=inpo", "method.inversion_model=ref"])


def test_bool_flags_turn_off():
    assert load_config(None, ["lora.enabled=false"]).lora.enabled is False
    assert load_config(None, ["data.paired_transforms=false"]).data.paired_transforms is False


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.method.name in METHODS and cfg.model.pretrained
    if cfg.method.data == "prompts":
        from diffalign.data.prompts import read_prompts
        from diffalign.rewards import REWARDS

        assert read_prompts(cfg.data.prompts)          # shipped prompt files exist and are not empty
        reward = cfg.method.reward
        assert (reward if isinstance(reward, str) else reward["name"]) in REWARDS
    elif cfg.data.prompts:                              # an iterative-DPO config: `diffalign iterate` writes the pairs
        from diffalign.data.prompts import read_prompts

        assert read_prompts(cfg.data.prompts) and not cfg.data.path
    else:
        assert cfg.data.path
    from diffalign.eval.sample import eval_prompts
    from diffalign.rewards import REWARDS

    assert len(eval_prompts(cfg)) >= 4                 # the shipped eval prompts (or the config's own)
    assert all((r if isinstance(r, str) else r["name"]) in REWARDS for r in cfg.eval.rewards)


def test_the_shipped_eval_prompt_file_is_varied_and_about_50_prompts():
    from diffalign.eval.sample import default_prompts, eval_prompts

    prompts = eval_prompts(load_config(None))
    assert default_prompts().is_file() and 45 <= len(prompts) <= 60 and len(set(prompts)) == len(prompts)


def test_every_option_is_documented():
    rows = describe_options()
    assert len(rows) > 40 and all(help_ for _, _, help_ in rows)
    assert ("train.max_steps", "2000") in [(k, d) for k, d, _ in rows]
