"""Tests for the preference-pair dataset (``diffalign.data.pairs``) and its transforms."""

from __future__ import annotations

import io
import json
import logging
import pickle
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data import transforms as T
from diffalign.data.pairs import BadImageError, DataError, PreferencePairs, collate_pairs

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the datasets arrow cache inside the test's tmp folder, never in ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def image_bytes(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    """A solid image of ``size`` = (width, height)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


def write_pickapic(path: Path, rows: list[tuple], drop: tuple[str, ...] = ()) -> Path:
    """rows: (caption, jpg_0 bytes, jpg_1 bytes, label_0) in the Pick-a-Pic v2 schema."""
    columns = {
        "caption": pa.array([r[0] for r in rows], pa.string()),
        "jpg_0": pa.array([r[1] for r in rows], pa.binary()),
        "jpg_1": pa.array([r[2] for r in rows], pa.binary()),
        "label_0": pa.array([r[3] for r in rows], pa.float64()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in columns.items() if k not in drop}), path)
    return path


def write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def cfg(path: Path | str, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"resolution": 8, **kw})


def colour_of(pixels: torch.Tensor) -> tuple[int, int, int]:
    """Mean colour of a [3,H,W] tensor in [-1,1], as rounded 0..255 values."""
    return tuple(int(round(float(c))) for c in (pixels.mean((1, 2)) + 1) * 127.5)


def near(a: tuple[int, ...], b: tuple[int, ...], tol: int = 8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def textured(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A noisy image (width, height) so that different crops and flips give different pixels."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --------------------------------------------------------------------------------------------- pickapic


def test_winner_orientation_follows_label(tmp_path: Path) -> None:
    path = write_pickapic(tmp_path / "p.parquet", [
        ("zero wins", image_bytes(RED, fmt="JPEG"), image_bytes(BLUE, fmt="JPEG"), 1.0),
        ("one wins", image_bytes(RED, fmt="JPEG"), image_bytes(BLUE, fmt="JPEG"), 0.0),
    ])
    ds = PreferencePairs(cfg(path))
    first, second = ds[0], ds[1]
    assert first["prompt"] == "zero wins" and second["prompt"] == "one wins"
    assert near(colour_of(first["pixels"][0]), RED) and near(colour_of(first["pixels"][1]), BLUE)
    assert near(colour_of(second["pixels"][0]), BLUE) and near(colour_of(second["pixels"][1]), RED)
    assert (first["index"], first["row"], second["index"], second["row"]) == (0, 0, 1, 1)


def test_image_feature_dicts_are_read(tmp_path: Path) -> None:
    features = datasets.Features({"caption": datasets.Value("string"), "jpg_0": datasets.Image(),
                                  "jpg_1": datasets.Image(), "label_0": datasets.Value("float64")})
    table = datasets.Dataset.from_dict({
        "caption": ["c"], "jpg_0": [{"bytes": image_bytes(GREEN), "path": None}],
        "jpg_1": [{"bytes": image_bytes(YELLOW), "path": None}], "label_0": [0.0]}, features=features)
    table.to_parquet(str(tmp_path / "img.parquet"))
    item = PreferencePairs(cfg(tmp_path / "img.parquet"))[0]
    assert near(colour_of(item["pixels"][0]), YELLOW) and near(colour_of(item["pixels"][1]), GREEN)


def test_ties_dropped_counted_and_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [(f"p{i}", img, img, lab)
                                                    for i, lab in enumerate([1.0, 0.5, 0.0, 0.5, 1.0])])
    with caplog.at_level(logging.INFO, logger="diffalign"):
        ds = PreferencePairs(cfg(path))
    assert ds.stats == {"rows": 5, "ties_dropped": 2, "pairs": 3}
    assert len(ds) == 3 and [ds.row(i) for i in range(3)] == [0, 2, 4]
    assert [ds.prompt(i) for i in range(3)] == ["p0", "p2", "p4"]
    assert len([r for r in caplog.records if "ties dropped" in r.getMessage()]) == 1
    assert "2 ties dropped" in caplog.text


def test_max_pairs_keeps_first_kept_pairs(tmp_path: Path) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [(f"p{i}", img, img, lab)
                                                    for i, lab in enumerate([0.5, 1.0, 0.5, 0.0, 1.0])])
    ds = PreferencePairs(cfg(path, max_pairs=2))
    assert len(ds) == 2 and [ds.row(i) for i in range(2)] == [1, 3]
    assert ds.stats == {"rows": 5, "ties_dropped": 2, "pairs": 2}


def test_ties_error_names_first_tie_row(tmp_path: Path) -> None:
    img = image_bytes(RED)
    rows = [("a", img, img, 1.0), ("b", img, img, 0.5), ("c", img, img, 0.5)]
    path = write_pickapic(tmp_path / "p.parquet", rows)
    with pytest.raises(DataError, match=r"row 1 is a tie.*2 of 3 rows"):
        PreferencePairs(cfg(path, ties="error"))


@pytest.mark.parametrize("label, shown", [(0.3, "0.3"), (None, "null"), (2.0, "2.0")])
def test_unknown_label_names_row(tmp_path: Path, label: float | None, shown: str) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [("a", img, img, 1.0), ("b", img, img, label)])
    with pytest.raises(DataError, match=rf"row 1: label_0 = {shown} is not 1"):
        PreferencePairs(cfg(path))


def test_missing_column_names_missing_and_found(tmp_path: Path) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [("a", img, img, 1.0)], drop=("jpg_1",))
    with pytest.raises(DataError) as err:
        PreferencePairs(cfg(path))
    message = str(err.value)
    assert str(path) in message and "missing column(s) jpg_1" in message
    assert "found columns: caption, jpg_0, label_0" in message


def test_empty_dataset_is_an_error(tmp_path: Path) -> None:
    path = write_pickapic(tmp_path / "empty.parquet", [])
    with pytest.raises(DataError, match=r"empty\.parquet: the dataset has no rows"):
        PreferencePairs(cfg(path))


def test_tie_only_dataset_is_an_error(tmp_path: Path) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [(str(i), img, img, 0.5) for i in range(3)])
    with pytest.raises(DataError, match="all 3 rows are ties"):
        PreferencePairs(cfg(path))


def test_corrupt_image_names_row_column_and_path(tmp_path: Path) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [("a", img, img, 1.0), ("b", img, b"not an image", 0.0)])
    ds = PreferencePairs(cfg(path))
    assert ds[0] is not None
    with pytest.raises(BadImageError) as err:
        ds[1]
    message = str(err.value)
    assert str(path) in message and "row 1" in message and "jpg_1" in message
    assert "UnidentifiedImageError" in message


def test_label_column_only_read_up_front(tmp_path: Path) -> None:
    """Corrupt image bytes do not break construction: images are decoded per item only."""
    path = write_pickapic(tmp_path / "p.parquet", [("a", b"junk", b"junk", 1.0)])
    assert len(PreferencePairs(cfg(path))) == 1


# ------------------------------------------------------------------------------------------ folder/split


def test_folder_split_files_discovery(tmp_path: Path) -> None:
    img = image_bytes(RED)
    data = tmp_path / "pickapic" / "data"
    write_pickapic(data / "train-00000-of-00002.parquet", [("t0", img, img, 1.0), ("t1", img, img, 0.0)])
    write_pickapic(data / "train-00001-of-00002.parquet", [("t2", img, img, 1.0)])
    write_pickapic(data / "test-00000-of-00001.parquet", [("x0", img, img, 1.0)])
    write_pickapic(data / "test_unique-00000-of-00001.parquet", [("u0", img, img, 1.0)])
    train = PreferencePairs(cfg(tmp_path / "pickapic"))
    assert [train.prompt(i) for i in range(len(train))] == ["t0", "t1", "t2"]
    test = PreferencePairs(cfg(tmp_path / "pickapic", split="test"))
    assert [test.prompt(i) for i in range(len(test))] == ["x0"]
    with pytest.raises(DataError) as err:
        PreferencePairs(cfg(tmp_path / "pickapic", split="validation"))
    assert str(tmp_path / "pickapic") in str(err.value)
    assert "splits found: test, test_unique, train" in str(err.value)


def test_folder_split_subfolder_and_unsplit_files(tmp_path: Path) -> None:
    img = image_bytes(RED)
    write_pickapic(tmp_path / "a" / "train" / "part.parquet", [("sub", img, img, 1.0)])
    write_pickapic(tmp_path / "a" / "validation" / "part.parquet", [("val", img, img, 1.0)])
    assert PreferencePairs(cfg(tmp_path / "a")).prompt(0) == "sub"
    write_pickapic(tmp_path / "b" / "one.parquet", [("one", img, img, 1.0)])
    write_pickapic(tmp_path / "b" / "two.parquet", [("two", img, img, 0.0)])
    write_pickapic(tmp_path / "b" / "three.parquet", [])  # a zero-row shard is skipped, not an error
    ds = PreferencePairs(cfg(tmp_path / "b"))
    assert [ds.prompt(i) for i in range(len(ds))] == ["one", "two"]
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"no parquet files for split 'train'"):
        PreferencePairs(cfg(tmp_path / "c"))


def test_hub_name_goes_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    table = datasets.Dataset.from_dict({"caption": ["h"], "jpg_0": [image_bytes(RED)],
                                        "jpg_1": [image_bytes(BLUE)], "label_0": [0.0]})

    def fake_load_dataset(path: str, split: str) -> datasets.Dataset:
        calls.append((path, split))
        return table

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = PreferencePairs(cfg("yuvalkirstain/pickapic_v2", split="validation_unique"))
    assert calls == [("yuvalkirstain/pickapic_v2", "validation_unique")]
    assert near(colour_of(ds[0]["pixels"][0]), BLUE)


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or folder"):
        PreferencePairs(cfg(tmp_path / "nope.parquet"))


# ------------------------------------------------------------------------------------------------ jsonl


def make_jsonl_pairs(tmp_path: Path, n: int = 4, missing: int | None = None) -> Path:
    """Pair i: winner colour COLOURS[i % 4], loser its complement; prompts "p{i}"; relative paths."""
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        colour = [RED, GREEN, BLUE, YELLOW][i % 4]
        Image.new("RGB", (10 + i, 9), colour).save(tmp_path / "img" / f"w{i}.png")
        Image.new("RGB", (9, 11), tuple(255 - c for c in colour)).save(tmp_path / "img" / f"l{i}.png")
        loser = "img/gone.png" if i == missing else f"img/l{i}.png"
        lines.append({"prompt": f"p{i}", "chosen": f"img/w{i}.png", "rejected": loser})
    return write_jsonl(tmp_path / "pairs.jsonl", lines)


def test_jsonl_reads_relative_paths_winner_first(tmp_path: Path) -> None:
    ds = PreferencePairs(cfg(make_jsonl_pairs(tmp_path)))
    assert ds.stats == {"rows": 4, "ties_dropped": 0, "pairs": 4, "duplicates": 0}
    item = ds[2]
    assert item["prompt"] == "p2" and near(colour_of(item["pixels"][0]), BLUE)
    assert near(colour_of(item["pixels"][1]), YELLOW)


def test_jsonl_missing_file_names_row_and_path(tmp_path: Path) -> None:
    ds = PreferencePairs(cfg(make_jsonl_pairs(tmp_path, missing=1)))
    with pytest.raises(BadImageError) as err:
        ds[1]
    message = str(err.value)
    assert "row 1 (line 2)" in message and "img/gone.png" in message and "FileNotFoundError" in message


def test_jsonl_bad_lines_name_the_line(tmp_path: Path) -> None:
    good = {"prompt": "a", "chosen": "x.png", "rejected": "y.png"}
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: invalid JSON"):
        PreferencePairs(cfg(write_jsonl(tmp_path / "bad.jsonl", [good, "{not json"])))
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", {"prompt": "b", "chosen": "x.png"}])
    with pytest.raises(DataError, match=r"line 3: missing key\(s\) rejected; found keys: prompt, chosen"):
        PreferencePairs(cfg(path))
    with pytest.raises(DataError, match="no pairs"):
        PreferencePairs(cfg(write_jsonl(tmp_path / "empty.jsonl", ["", "  "])))


def test_skip_pair_drops_whole_pair_and_keeps_alignment(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ds = PreferencePairs(cfg(make_jsonl_pairs(tmp_path, n=4, missing=1), on_bad_image="skip_pair"))
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        items = [ds[i] for i in range(4)]
    assert items[1] is None
    assert "row 1" in caplog.text and "img/gone.png" in caplog.text
    batch = collate_pairs(items)
    assert batch["num_skipped"] == 1 and batch["prompts"] == ["p0", "p2", "p3"]
    assert batch["indices"].tolist() == [0, 2, 3] and batch["pixels"].shape == (6, 3, 8, 8)
    winners = [RED, BLUE, YELLOW]
    for k, colour in enumerate(winners):
        assert near(colour_of(batch["pixels"][k]), colour)
        assert near(colour_of(batch["pixels"][3 + k]), tuple(255 - c for c in colour))
    empty = collate_pairs([None, None])
    assert empty["num_skipped"] == 2 and empty["prompts"] == [] and empty["pixels"].shape[0] == 0


def test_collate_orders_winners_then_losers(tmp_path: Path) -> None:
    ds = PreferencePairs(cfg(make_jsonl_pairs(tmp_path, n=3)))
    items = [ds[i] for i in range(3)]
    batch = PreferencePairs.collate(items)
    for key in ("pixels", "original_sizes", "crops"):
        expected = torch.cat([torch.stack([it[key][0] for it in items]),
                              torch.stack([it[key][1] for it in items])])
        assert torch.equal(batch[key], expected)
    assert batch["original_sizes"][:3].tolist() == [[9, 10], [9, 11], [9, 12]]
    assert batch["num_skipped"] == 0 and batch["rows"].tolist() == [0, 1, 2]


# ------------------------------------------------------------------------------------------- transforms


def write_textured_pairs(tmp_path: Path, n: int, loser_size: tuple[int, int] | None = None) -> Path:
    """Winner: a 40x24 (w x h) noise image; loser: the same image, or other noise of ``loser_size``."""
    lines = []
    for i in range(n):
        textured((40, 24), seed=i).save(tmp_path / f"w{i}.png")
        loser = textured(loser_size, seed=100 + i) if loser_size else textured((40, 24), seed=i)
        loser.save(tmp_path / f"l{i}.png")
        lines.append({"prompt": f"p{i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    return write_jsonl(tmp_path / "pairs.jsonl", lines)


def test_paired_random_crop_and_flip_are_shared(tmp_path: Path) -> None:
    path = write_textured_pairs(tmp_path, 6)
    paired = PreferencePairs(cfg(path, crop="random", hflip=0.5))
    unpaired = PreferencePairs(cfg(path, crop="random", hflip=0.5, paired_transforms=False))
    differs = 0
    for epoch in range(3):
        paired.set_epoch(epoch)
        unpaired.set_epoch(epoch)
        for i in range(6):
            item = paired[i]
            assert torch.equal(item["pixels"][0], item["pixels"][1])
            assert torch.equal(item["crops"][0], item["crops"][1])
            other = unpaired[i]
            differs += not torch.equal(other["pixels"][0], other["pixels"][1])
    assert differs > 0


def test_paired_crop_uses_fractions_for_different_sizes(tmp_path: Path) -> None:
    path = write_textured_pairs(tmp_path, 8, loser_size=(50, 24))
    ds = PreferencePairs(cfg(path, crop="random", resolution=12))
    lefts = []
    for i in range(8):
        (w_top, w_left), (l_top, l_left) = ds[i]["crops"].tolist()
        # winner 24x40 (h x w) -> 12x20: left in 0..8; loser 24x50 -> 12x25: left in 0..13; one shared
        # fraction f gives left = floor(f * (margin + 1)), so left / (margin + 1) agree to within 1/9.
        assert w_top == l_top == 0 and abs(w_left / 9 - l_left / 14) < 1 / 9
        lefts.append(w_left)
    assert len(set(lefts)) > 1


def test_determinism_across_instances_pickling_and_epochs(tmp_path: Path) -> None:
    path = write_textured_pairs(tmp_path, 4)
    a = PreferencePairs(cfg(path, crop="random", hflip=0.5), seed=3)
    b = pickle.loads(pickle.dumps(PreferencePairs(cfg(path, crop="random", hflip=0.5), seed=3)))
    for i in range(4):
        x, y = a[i], b[i]
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["crops"], y["crops"])
    crops = set()
    for epoch in range(4):
        a.set_epoch(epoch)
        crops.add(tuple(a[0]["crops"][0].tolist()))
    assert len(crops) > 1
    a.set_epoch(0)
    assert torch.equal(a[0]["pixels"], b[0]["pixels"])


def test_dataloader_workers_match_in_process(tmp_path: Path) -> None:
    ds = PreferencePairs(cfg(write_textured_pairs(tmp_path, 4), crop="random", hflip=0.5), seed=1)
    ds.set_epoch(2)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_pairs, num_workers=2)
    batches = list(loader)
    expected = [collate_pairs([ds[0], ds[1]]), collate_pairs([ds[2], ds[3]])]
    for got, want in zip(batches, expected, strict=True):
        assert torch.equal(got["pixels"], want["pixels"]) and torch.equal(got["crops"], want["crops"])


def test_item_rng_is_stable() -> None:
    assert T.item_rng(0, 0, 5).random() == T.item_rng(0, 0, 5).random()
    assert T.item_rng(0, 0, 5).random() != T.item_rng(0, 1, 5).random()
    assert T.item_rng(0, 0, 5).random() != T.item_rng(1, 0, 5).random()
    # fixed values: a change to the derivation would silently change every augmentation and dropout decision
    assert T.item_rng(0, 0, 0).random() == 0.2559722177864735
    assert T.item_rng(7, 3, 123456).random() == 0.44537313100440257


def test_shape_dtype_and_range(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    Image.new("RGB", (30, 20), (255, 255, 255)).save(tmp_path / "white.png")
    Image.new("L", (20, 30), 0).save(tmp_path / "black.png")  # grey-scale input is converted to RGB
    write_jsonl(path, [{"prompt": "p", "chosen": "white.png", "rejected": "black.png"}])
    item = PreferencePairs(cfg(path, resolution=16))[0]
    pixels = item["pixels"]
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32
    assert torch.all(pixels[0] == 1.0) and torch.all(pixels[1] == -1.0)
    assert item["original_sizes"].dtype == torch.long and item["crops"].dtype == torch.long


def test_center_crop_records_original_size_and_crop(tmp_path: Path) -> None:
    textured((300, 200)).save(tmp_path / "wide.png")  # width 300, height 200
    textured((100, 250)).save(tmp_path / "tall.png")  # width 100, height 250
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "chosen": "wide.png", "rejected": "tall.png"}])
    item = PreferencePairs(cfg(path, resolution=64, hflip=1.0))[0]
    # wide: 200x300 -> 64x96, center crop left = 32/2 = 16; tall: 250x100 -> 160x64, top = 96/2 = 48.
    assert item["original_sizes"].tolist() == [[200, 300], [250, 100]]
    assert item["crops"].tolist() == [[0, 16], [48, 0]]  # a flip does not change the recorded crop
    assert T.resized_size(200, 300, 64) == (64, 96) and T.resized_size(250, 100, 64) == (160, 64)
    unflipped = PreferencePairs(cfg(path, resolution=64))[0]
    assert torch.equal(item["pixels"], unflipped["pixels"].flip(-1))


def test_caption_dropout_rate_and_determinism(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    n = 400
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": f"p{i}", "chosen": "a.png", "rejected": "a.png"}
                                              for i in range(n)])
    ds = PreferencePairs(cfg(path, caption_dropout=0.3))
    prompts = [ds[i]["prompt"] for i in range(n)]
    dropped = [p == "" for p in prompts]
    assert 0.2 < sum(dropped) / n < 0.4
    assert dropped == [ds.caption_dropped(i) for i in range(n)]
    assert prompts == [PreferencePairs(cfg(path, caption_dropout=0.3))[i]["prompt"] for i in range(n)]
    assert all(ds.prompt(i) == f"p{i}" for i in range(n))  # prompt() never drops
    assert not any(PreferencePairs(cfg(path, caption_dropout=0.3), caption_dropout=0.0).caption_dropped(i)
                   for i in range(n))
    ds.set_epoch(1)
    assert [ds.caption_dropped(i) for i in range(n)] != dropped


def test_invalid_settings_are_rejected(tmp_path: Path) -> None:
    path = make_jsonl_pairs(tmp_path, n=1)
    with pytest.raises(DataError, match="max_pairs"):
        PreferencePairs(cfg(path, max_pairs=0))
    with pytest.raises(DataError, match="hflip"):
        PreferencePairs(cfg(path, hflip=1.5))
    with pytest.raises(DataError, match="data.path is empty"):
        PreferencePairs(DataConfig(path=""))


# ------------------------------------------------------------------------------------------- odd but valid input


def test_null_prompts_are_errors_in_both_formats_unless_asked_for(tmp_path: Path) -> None:
    img = image_bytes(RED)
    path = write_pickapic(tmp_path / "p.parquet", [("a", img, img, 1.0), (None, img, img, 0.0)])
    with pytest.raises(DataError, match=r"row 1: caption is null"):
        PreferencePairs(cfg(path))
    assert PreferencePairs(cfg(path, null_prompt="empty"))[1]["prompt"] == ""
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    lines = [{"prompt": None, "chosen": "a.png", "rejected": "a.png"}]
    jsonl = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=r"line 1: `prompt` is null; set data.null_prompt=empty"):
        PreferencePairs(cfg(jsonl))
    assert PreferencePairs(cfg(jsonl, null_prompt="empty"))[0]["prompt"] == ""


@pytest.mark.parametrize("where", ["../outside.png", "/etc/passwd", "img/../../outside.png"])
def test_jsonl_paths_outside_the_data_folder_are_refused(tmp_path: Path, where: str) -> None:
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (8, 8), RED).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8), RED).save(tmp_path / "data" / "in.png")
    jsonl = write_jsonl(tmp_path / "data" / "p.jsonl", [{"prompt": "x", "chosen": "in.png", "rejected": where}])
    with pytest.raises(DataError, match=r"line 1: `rejected` = .* points outside the jsonl file's folder"):
        PreferencePairs(cfg(jsonl))
    if where != "/etc/passwd":
        assert PreferencePairs(cfg(jsonl, outside_paths=True))[0]["pixels"].shape == (2, 3, 8, 8)


def test_transparency_is_composited_on_white_and_16_bit_grey_is_scaled(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))                 # fully transparent red
    assert near(colour_of(T.to_tensor(T.to_rgb(rgba))), (255, 255, 255), tol=0)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))                 # half-transparent black
    assert near(colour_of(T.to_tensor(T.to_rgb(half))), (127, 127, 127), tol=1)
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    grey16.save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as opened:
        assert opened.mode.startswith("I")
        assert near(colour_of(T.to_tensor(T.to_rgb(opened))), (128, 128, 128), tol=1)   # not clipped to 255


def test_duplicate_pairs_are_counted_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "b.png")
    pair = {"prompt": "x", "chosen": "a.png", "rejected": "b.png"}
    jsonl = write_jsonl(tmp_path / "p.jsonl", [pair, {**pair, "prompt": "y"}, pair, pair])
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        ds = PreferencePairs(cfg(jsonl))
    assert ds.stats["duplicates"] == 2 and len(ds) == 4
    assert "2 pair(s) repeat an earlier pair (first: row 2 repeats row 0)" in caplog.text


def test_data_check_reports_unreadable_rows_prompts_and_sizes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`diffalign data check` reads every pair (here with 2 workers) and names the row and file that fail."""
    from diffalign import cli
    from diffalign.data.toy import write_toy_pairs

    pairs = write_toy_pairs(tmp_path / "toy", num_pairs=8, size=32)
    lines = pairs.read_text().splitlines()
    broken = json.loads(lines[3])["rejected"]
    (tmp_path / "toy" / broken).write_bytes(b"not a png")                       # pair 3: a corrupt loser
    small = json.loads(lines[5])["chosen"]
    Image.new("RGB", (16, 24), (200, 30, 30)).save(tmp_path / "toy" / small)    # pair 5: below the resolution
    report = tmp_path / "report.json"
    code = cli.main(["data", "check", "configs/toy_dpo.yaml", f"data.path={pairs}", "--workers", "2",
                     "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1
    assert f"pair 3 (row 3): {pairs}: row 3 (line 4): cannot read rejected image {broken}" in out
    saved = json.loads(report.read_text())
    assert saved["pairs"] == 8 and saved["unreadable_pairs"] == 1 and saved["prompts"] == 8
    assert saved["sizes"]["width"] == {"min": 16, "median": 32, "max": 32}
    assert saved["sizes"]["below_resolution"] == 1 and saved["sizes"]["aspect_max"] == 1.5
    (tmp_path / "toy" / broken).write_bytes((tmp_path / "toy" / small).read_bytes())
    assert cli.main(["data", "check", "configs/toy_dpo.yaml", f"data.path={pairs}", "--workers", "0"]) == 0
    assert "unreadable pairs: 0" in capsys.readouterr().out
    assert cli.main(["data", "check", "configs/toy_dpo.yaml", f"data.path={tmp_path / 'missing.jsonl'}"]) == 2


def test_a_folder_of_pair_folders_trains_like_jsonl(tmp_path: Path) -> None:
    """data.format auto-detects a folder whose subfolders hold prompt.txt, chosen.<ext>, rejected.<ext>; pairs
    equal the jsonl source's, layout errors name the subfolder, and a changed image changes the fingerprint."""
    from diffalign.data.pairs import resolve_format, source_fingerprint
    from diffalign.data.toy import write_toy_pairs

    jsonl = write_toy_pairs(tmp_path / "toy", num_pairs=3, size=32)
    root = tmp_path / "pairs"
    for i, line in enumerate(jsonl.read_text().splitlines()):
        record = json.loads(line)
        folder = root / f"pair-{i:03d}"
        folder.mkdir(parents=True)
        (folder / "prompt.txt").write_text(record["prompt"] + "\n")
        Image.open(tmp_path / "toy" / record["chosen"]).save(folder / "chosen.png")
        Image.open(tmp_path / "toy" / record["rejected"]).convert("RGB").save(folder / "rejected.jpg", quality=100)
    cfg = DataConfig(path=str(root), resolution=32)
    assert resolve_format(cfg) == "folder"
    folder_pairs, json_pairs = PreferencePairs(cfg), PreferencePairs(DataConfig(path=str(jsonl), resolution=32))
    assert len(folder_pairs) == 3 and folder_pairs.prompt(2) == json_pairs.prompt(2)
    torch.testing.assert_close(folder_pairs[1]["pixels"][0], json_pairs[1]["pixels"][0])     # the PNG winner
    before = source_fingerprint(cfg)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(root / "pair-001" / "chosen.png")
    assert source_fingerprint(cfg) != before
    (root / "pair-002" / "rejected.jpg").unlink()
    with pytest.raises(DataError, match=r"pair-002: no rejected.<image> file"):
        PreferencePairs(cfg)
    (root / "pair-002" / "rejected.png").write_bytes(b"x")
    (root / "pair-002" / "rejected.webp").write_bytes(b"x")
    with pytest.raises(DataError, match=r"pair-002: 2 rejected.<image> file\(s\)"):
        PreferencePairs(cfg)
    (root / "pair-002" / "rejected.webp").unlink()
    with pytest.raises(BadImageError, match=r"row 2 \(pair-002\): cannot read rejected.png"):
        PreferencePairs(cfg)[2]


def test_scored_jsonl_pairs_keep_those_above_the_margin_oriented_by_score(tmp_path: Path) -> None:
    from diffalign.data.toy import write_toy_pairs

    jsonl = write_toy_pairs(tmp_path / "toy", num_pairs=4, size=32)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    scores = [(0.9, 0.1), (0.5, 0.45), (0.2, 0.8), (0.3, 0.3)]      # kept, within margin, flipped, tie
    scored = tmp_path / "toy" / "scored.jsonl"
    scored.write_text("".join(json.dumps({**r, "chosen_score": c, "rejected_score": w}) + "\n"
                              for r, (c, w) in zip(records, scores, strict=True)))
    pairs = PreferencePairs(DataConfig(path=str(scored), resolution=32, min_score_margin=0.1))
    assert len(pairs) == 2 and [pairs.row(i) for i in range(2)] == [0, 2]
    assert pairs.stats == {"rows": 4, "ties_dropped": 0, "pairs": 2, "duplicates": 0, "below_margin": 2,
                           "flipped_by_score": 1}
    plain = PreferencePairs(DataConfig(path=str(jsonl), resolution=32))
    torch.testing.assert_close(pairs[1]["pixels"][0], plain[2]["pixels"][1])    # the rejected image now wins
    torch.testing.assert_close(pairs[1]["pixels"][1], plain[2]["pixels"][0])
    scored.write_text(scored.read_text() + json.dumps(records[0]) + "\n")
    with pytest.raises(DataError, match=r"line 5: data.min_score_margin is set, so every line needs numeric"):
        PreferencePairs(DataConfig(path=str(scored), resolution=32, min_score_margin=0.1))


def test_ranked_lines_expand_to_every_pair_with_different_ranks(tmp_path: Path) -> None:
    """HPDv2-style ranking: {"prompt", "images", "ranks"}, lower rank preferred; 4 images ranked 1, 2, 2, 3 give
    the 5 pairs whose ranks differ, better image first; rows number the pairs, messages name the line."""
    folder = tmp_path / "ranked"
    folder.mkdir()
    for k, shade in enumerate((10, 60, 110, 160)):
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(folder / f"{k}.png")
    line = {"prompt": "a grey square", "images": ["2.png", "0.png", "3.png", "1.png"], "ranks": [2, 1, 3, 2]}
    plain = {"prompt": "plain", "chosen": "0.png", "rejected": "3.png"}
    (folder / "ranked.jsonl").write_text(json.dumps(line) + "\n\n" + json.dumps(plain) + "\n")
    pairs = PreferencePairs(DataConfig(path=str(folder / "ranked.jsonl"), resolution=32))
    assert len(pairs) == 6 and [pairs.row(i) for i in range(6)] == list(range(6))
    named = [pairs._source._records[i][1:] for i in range(5)]
    assert named == [("0.png", "2.png"), ("0.png", "1.png"), ("0.png", "3.png"), ("2.png", "3.png"),
                     ("1.png", "3.png")]
    assert pairs.prompt(5) == "plain"
    (folder / "1.png").write_bytes(b"broken")
    with pytest.raises(BadImageError, match=r"ranked.jsonl: row 4 \(line 1\): cannot read chosen image 1.png"):
        pairs[4]
    (folder / "bad.jsonl").write_text(json.dumps({"prompt": "x", "images": ["0.png"], "ranks": [1]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 1: a ranked line needs"):
        PreferencePairs(DataConfig(path=str(folder / "bad.jsonl"), resolution=32))
