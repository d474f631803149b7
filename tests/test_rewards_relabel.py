"""Relabelling preference pairs with a reward (AI feedback) through the CLI."""

import json

from PIL import Image

from diffalign import cli


def test_relabel_flips_pairs_the_reward_disagrees_with(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name, level in [("dark.png", 30), ("light.png", 220), ("mid.png", 120)]:
        Image.new("RGB", (16, 12), (level,) * 3).save(src / name)
    lines = [{"prompt": "p0", "chosen": "light.png", "rejected": "dark.png"},    # brightness agrees
             {"prompt": "p1", "chosen": "dark.png", "rejected": "mid.png"}]      # brightness disagrees: flip
    (src / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    code = cli.main(["relabel", "configs/tiny_dpo_sd15.yaml", f"data.path={src / 'pairs.jsonl'}",
                     "--reward", "brightness", "--out", str(out)])
    assert code == 0
    assert "2 pairs scored with brightness, 1 flipped, 0 skipped" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["flipped"] for r in rows] == [False, True]
    assert rows[1]["score_chosen"] > rows[1]["score_rejected"]
    chosen = Image.open(out / rows[1]["chosen"])
    assert chosen.getpixel((0, 0)) == (120, 120, 120)                         # the mid-grey image now wins
    assert not (out / ".pairs.jsonl.tmp").exists()

    code = cli.main(["relabel", "configs/tiny_dpo_sd15.yaml", f"data.path={src / 'pairs.jsonl'}",
                     "--reward", "{name: nope}", "--out", str(out)])
    assert code == 2 and "unknown reward 'nope'" in capsys.readouterr().err
