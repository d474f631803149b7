"""Sharded sources: the direct parquet reader (``data/parquet.py``), tar shards (``data/tar.py``), fsspec URLs,
and the block-window epoch order (``sampler.block_window_order``) with its memory bound and resume."""

from __future__ import annotations

import io
import json
import logging
import pickle
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffalign.config import DataConfig
from diffalign.data import pairs as P
from diffalign.data.pairs import BadImageError, DataError, PreferencePairs, collate_pairs
from diffalign.data.sampler import EpochBatches, block_window_order

LABELS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the datasets arrow cache (the old path, compared against) inside the test's tmp folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def png(i: int, side: int) -> bytes:
    """A distinct 4x3 image per (row, side), so a swapped or shifted pair cannot go unnoticed."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3), (i * 12 % 256, 200 * side, (i * 37 + side * 90) % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def rows(n: int = len(LABELS), null_caption: int | None = 4, repeat: tuple[int, int] | None = (13, 3)) -> list[dict]:
    """Pick-a-Pic rows with ties, a null caption and (caption, uids) of row ``repeat[0]`` equal to ``repeat[1]``'s."""
    out = [{"caption": None if i == null_caption else f"p{i}", "jpg_0": png(i, 0), "jpg_1": png(i, 1),
            "label_0": LABELS[i % len(LABELS)], "image_0_uid": f"a{i}", "image_1_uid": f"b{i}"} for i in range(n)]
    if repeat:
        dup, orig = repeat
        out[dup].update({k: out[orig][k] for k in ("caption", "image_0_uid", "image_1_uid")})
    return out


def write_parquet(path: Path, records: list[dict], group_rows: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("image_0_uid", pa.string()), ("image_1_uid", pa.string())])
    table = pa.Table.from_pylist(records, schema=schema)
    pq.write_table(table, path, row_group_size=group_rows)
    return path


def write_set(folder: Path, records: list[dict], splits: tuple[int, ...] = (7, 7), group_rows: int = 3) -> Path:
    """``records`` cut into train-0000k-of-0000n.parquet files of ``splits`` rows (the rest in the last), plus
    an empty shard in between (skipped, as before)."""
    bounds = np.cumsum([0, *splits, len(records) - sum(splits)])
    n = len(bounds) - 1
    for k in range(n):
        write_parquet(folder / f"train-{k:05d}-of-{n + 1:05d}.parquet", records[bounds[k]:bounds[k + 1]], group_rows)
    write_parquet(folder / f"train-{n:05d}-of-{n + 1:05d}.parquet", [])
    return folder


def cfg(path: Path | str, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"resolution": 8, "null_prompt": "empty", **kw})


def raw(images: tuple[Image.Image, Image.Image]) -> tuple[bytes, bytes]:
    return tuple(image.tobytes() for image in images)


def old_source(folder: Path, config: DataConfig) -> tuple[object, dict]:
    """The datasets-based reader this replaces: load_dataset("parquet") (an Arrow copy), then the table rules."""
    files = [str(f) for f in sorted(folder.glob("*.parquet")) if pq.read_metadata(f).num_rows]
    return P._open_table(datasets.load_dataset("parquet", data_files=files, split="train"), config)


def same_pairs(new: object, old: object) -> None:
    assert new.rows.tolist() == old.rows.tolist()
    for i in range(len(old.rows)):
        assert new.prompt(i) == old.prompt(i)
        assert raw(new.images(i)) == raw(old.images(i))


# ------------------------------------------------------------------------------------------ parquet


def test_parquet_reader_equals_the_datasets_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = write_set(tmp_path / "set", rows())
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        new = [PreferencePairs(config) for config in (cfg(folder), cfg(folder, max_pairs=9))]
    assert not (tmp_path / "hf_cache").exists()                         # no Arrow copy of the set
    for ds in new:
        old, old_stats = old_source(folder, ds.cfg)
        assert ds.stats == old_stats and type(ds._source).__name__ == "ParquetPairs"
        same_pairs(ds._source, old)
    assert ds.stats == {"rows": 20, "ties_dropped": 4, "pairs": 9, "duplicates": 0}
    assert PreferencePairs(cfg(folder)).stats["duplicates"] == 1
    assert "1 pair(s) repeat an earlier pair (first: row 13 repeats row 3)" in caplog.text
    assert PreferencePairs(cfg(folder)).prompt(3) == ""                   # row 4: the null caption


def test_parquet_errors_name_the_file_and_row(tmp_path: Path) -> None:
    one = write_parquet(tmp_path / "one" / "p.parquet", rows())
    for config in (cfg(one, null_prompt="error"), cfg(one, ties="error")):       # one file: the old messages
        with pytest.raises(DataError) as new:
            PreferencePairs(config)
        with pytest.raises(DataError) as old:
            old_source(one.parent, config)
        assert str(new.value) == str(old.value)
    assert "row 2 is a tie" in str(new.value)
    folder = write_set(tmp_path / "set", rows())
    with pytest.raises(DataError, match=r"row 4 \(train-00000-of-00004.parquet, row 4\): caption is null"):
        PreferencePairs(cfg(folder, null_prompt="error"))
    bad = rows()
    bad[9]["label_0"] = 0.3
    write_set(tmp_path / "labels", bad)
    with pytest.raises(DataError, match=r"row 9 \(train-00001-of-00004.parquet, row 2\): label_0 = 0.3 is not 1"):
        PreferencePairs(cfg(tmp_path / "labels"))
    broken = rows()
    broken[8]["jpg_1"] = b"not an image"
    ds = PreferencePairs(cfg(write_set(tmp_path / "broken", broken)))
    with pytest.raises(BadImageError, match=r"row 8 \(train-00001-of-00004.parquet, row 1\): cannot read image "
                                            r"column jpg_1: UnidentifiedImageError"):
        ds[int(np.flatnonzero(ds._source.rows == 8)[0])]
    pq.write_table(pa.table({"caption": ["x"], "jpg_0": [b""], "label_0": [1.0]}),
                   tmp_path / "set" / "train-00002-of-00004.parquet")
    with pytest.raises(DataError, match=r"train-00002-of-00004.parquet: missing column\(s\) jpg_1; found columns: "
                                        r"caption, jpg_0, label_0"):
        PreferencePairs(cfg(folder))
    (tmp_path / "set" / "train-00002-of-00004.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(DataError, match=r"train-00002-of-00004.parquet: not a readable parquet file"):
        PreferencePairs(cfg(folder))


def binarized(records: list[dict]) -> list[dict]:
    """Pick-a-Pic rows (no ties) in the binarized layout: the winner under ``chosen``, datasets ``Image`` values,
    and the extra columns such sets carry."""
    out = []
    for r in records:
        chosen, rejected = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        out.append({"id": r["image_0_uid"], "prompt": r["caption"], "chosen": {"bytes": chosen, "path": None},
                    "rejected": {"bytes": rejected, "path": None}, "chosen_model": "a", "rejected_model": "b"})
    return out


def write_binarized(folder: Path, records: list[dict], group_rows: int = 3) -> Path:
    """Two train shards written by datasets (Image features) with ``group_rows``-row groups."""
    features = datasets.Features({"id": datasets.Value("string"), "prompt": datasets.Value("string"),
                                  "chosen": datasets.Image(), "rejected": datasets.Image(),
                                  "chosen_model": datasets.Value("string"), "rejected_model": datasets.Value("string")})
    folder.mkdir(parents=True, exist_ok=True)
    half = len(records) // 2
    for k, part in enumerate((records[:half], records[half:])):
        table = datasets.Dataset.from_list(part, features=features).data.table
        pq.write_table(table, folder / f"train-{k:05d}-of-00002.parquet", row_group_size=group_rows)
    return folder


def test_prompt_chosen_rejected_layout_reads_the_same_pairs_as_pickapic(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The binarized layout (open-image-preferences-v1-binarized, trl's image preference sets): chosen is the winner,
    read in place by row group, from a hub name through datasets too; the same pairs, order and memory bound as
    the Pick-a-Pic form of the same data."""
    records = [r for r in rows(null_caption=None, repeat=None) if r["label_0"] != 0.5]
    pickapic = PreferencePairs(cfg(write_parquet(tmp_path / "pickapic.parquet", records)))
    folder = write_binarized(tmp_path / "binarized", binarized(records))
    ds = PreferencePairs(cfg(folder))
    assert type(ds._source).__name__ == "ParquetPairs" and ds._source.layout.name == "prompt/chosen/rejected"
    assert ds.stats == {"rows": 16, "ties_dropped": 0, "pairs": 16}
    same_pairs(ds._source, pickapic._source)
    assert ds._source.blocks.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5]   # 8 rows per file
    assert ds._source.group_bytes > 0
    assert ds[0]["pixels"].shape == (2, 3, 8, 8)

    hub = datasets.Dataset.from_parquet([str(f) for f in sorted(folder.glob("*.parquet"))])
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split: hub)
    from_hub = PreferencePairs(cfg("data-is-better-together/open-image-preferences-v1-binarized"))
    assert type(from_hub._source).__name__ == "_Table" and from_hub.stats == ds.stats
    same_pairs(from_hub._source, pickapic._source)


def test_prompt_chosen_rejected_errors_name_the_column_file_and_row(tmp_path: Path) -> None:
    records = binarized([r for r in rows(null_caption=None, repeat=None) if r["label_0"] != 0.5])
    records[5]["prompt"] = None
    records[9]["rejected"] = {"bytes": b"not an image", "path": None}
    folder = write_binarized(tmp_path / "set", records)
    with pytest.raises(DataError, match=r"row 5 \(train-00000-of-00002.parquet, row 5\): prompt is null"):
        PreferencePairs(cfg(folder, null_prompt="error"))
    ds = PreferencePairs(cfg(folder))
    with pytest.raises(BadImageError, match=r"row 9 \(train-00001-of-00002.parquet, row 1\): cannot read image "
                                            r"column rejected: UnidentifiedImageError"):
        ds[9]
    pq.write_table(pa.table({"prompt": ["x"], "chosen": [b""]}), folder / "train-00001-of-00002.parquet")
    with pytest.raises(DataError, match=r"train-00001-of-00002.parquet: missing column\(s\) rejected; found columns: "
                                        r"prompt, chosen \(the set has the prompt/chosen/rejected layout of "
                                        r"train-00000-of-00002.parquet\)"):
        PreferencePairs(cfg(folder))
    write_parquet(folder / "train-00001-of-00002.parquet", rows(3, repeat=None))   # a Pick-a-Pic file in the set
    with pytest.raises(DataError, match=r"train-00001-of-00002.parquet: missing column\(s\) prompt, chosen, rejected"):
        PreferencePairs(cfg(folder))
    lone = tmp_path / "lone.parquet"
    pq.write_table(pa.table({"prompt": ["x"], "chosen": [b""], "score": [1.0]}), lone)
    with pytest.raises(DataError) as err:
        PreferencePairs(cfg(lone))
    assert str(err.value) == (f"{lone}: missing column(s) rejected; found columns: prompt, chosen, score (a "
                              "preference table has caption, jpg_0, jpg_1, label_0 or prompt, chosen, rejected)")


def test_parquet_pairs_pickle_without_their_cache_and_load_in_workers(tmp_path: Path) -> None:
    ds = PreferencePairs(cfg(write_set(tmp_path / "set", rows()), crop="random", hflip=0.5), seed=2)
    first = ds[0]
    assert len(ds._source._cache) == 1
    copy = pickle.loads(pickle.dumps(ds))
    assert len(copy._source._cache) == 0 and torch.equal(copy[0]["pixels"], first["pixels"])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_pairs, num_workers=2)
    got = torch.cat([b["pixels"][:b["indices"].numel()] for b in loader])
    want = torch.stack([ds[i]["pixels"][0] for i in range(len(ds))])
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ epoch order


def lru_loads(order: np.ndarray, blocks: np.ndarray, capacity: int) -> int:
    """Block reads of an LRU cache of ``capacity`` blocks serving ``order``."""
    from diffalign.data.parquet import BlockCache

    cache = BlockCache(capacity)
    for i in order:
        cache.get(int(blocks[i]), lambda: None)
    return cache.loads


def test_block_window_order_is_a_deterministic_windowed_permutation() -> None:
    blocks = np.repeat(np.arange(40), np.random.default_rng(0).integers(1, 9, 40))     # uneven blocks
    order = block_window_order(blocks, 4, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(blocks.size))
    assert np.array_equal(order, block_window_order(blocks, 4, seed=3, epoch=1))
    assert not np.array_equal(order, block_window_order(blocks, 4, seed=3, epoch=2))
    assert not np.array_equal(order, block_window_order(blocks, 4, seed=4, epoch=1))
    assert lru_loads(order, blocks, 4) == 40                       # each block read once by a 4-block cache ...
    assert not np.all(np.diff(blocks[order]) >= 0)                 # ... while the blocks come in random order
    assert lru_loads(order, blocks, 3) > 40                         # a smaller cache would re-read
    contiguous = block_window_order(blocks, 1, seed=0, epoch=0)
    assert np.count_nonzero(np.diff(blocks[contiguous])) == 39      # window 1: one block after another
    full = block_window_order(blocks, 40, seed=0, epoch=0)
    assert lru_loads(full, blocks, 40) == 40


def test_epoch_order_only_for_block_sources_and_independent_of_process_count(tmp_path: Path) -> None:
    folder = write_set(tmp_path / "set", rows(60, repeat=None), splits=(20, 20), group_rows=4)
    ds = PreferencePairs(cfg(folder, shuffle_window=2))
    order = ds.epoch_order(5, 0)
    assert sorted(order.tolist()) == list(range(len(ds)))
    assert PreferencePairs(cfg(folder, shuffle_window=0)).epoch_order(5, 0) is None
    jsonl = tmp_path / "p.jsonl"
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    jsonl.write_text("".join(json.dumps({"prompt": f"x{i}", "chosen": "a.png", "rejected": "a.png"}) + "\n"
                             for i in range(6)))
    assert PreferencePairs(cfg(jsonl)).epoch_order(5, 0) is None
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5 * 100_003)).tolist()   # the old order
    assert list(EpochBatches(6, 2, 5, 0, order=PreferencePairs(cfg(jsonl)).epoch_order)) == \
        [perm[k:k + 2] for k in (0, 2, 4)]
    single = list(EpochBatches(len(ds), 6, 5, 0, order=ds.epoch_order))
    assert [i for batch in single for i in batch] == order[:len(single) * 6].tolist()
    for world, batch in ((2, 3), (3, 2), (6, 1)):
        ranks = [list(EpochBatches(len(ds), batch, 5, 0, rank=r, world=world, order=ds.epoch_order))
                 for r in range(world)]
        assert [sum((ranks[r][k] for r in range(world)), []) for k in range(len(ranks[0]))] == single
    with pytest.raises(ValueError, match="permutation of its 8 items"):
        list(EpochBatches(8, 2, 0, 0, order=lambda seed, epoch: [0] * 8))


def test_resume_mid_epoch_continues_the_block_order(tmp_path: Path) -> None:
    """A resumed run (a new process: new dataset object, start = the global batches already drawn) draws exactly
    the rest of the uninterrupted epoch's batches, and the same items."""
    folder = write_set(tmp_path / "set", rows(60, repeat=None), splits=(20, 20), group_rows=4)
    first = PreferencePairs(cfg(folder, shuffle_window=3), seed=1)
    first.set_epoch(2)
    whole = list(EpochBatches(len(first), 2, 1, 2, rank=1, world=2, order=first.epoch_order))
    resumed = PreferencePairs(cfg(folder, shuffle_window=3), seed=1)
    resumed.set_epoch(2)
    tail = list(EpochBatches(len(resumed), 2, 1, 2, start=4, rank=1, world=2, order=resumed.epoch_order))
    assert tail == whole[4:]
    for a, b in zip(tail[:2], whole[4:6], strict=True):
        assert torch.equal(collate_pairs([resumed[i] for i in a])["pixels"],
                           collate_pairs([first[i] for i in b])["pixels"])


class _CacheProbe(torch.utils.data.Dataset):
    """Reads pair i and reports how many row groups this process's reader holds and has held at most."""

    def __init__(self, pairs: PreferencePairs) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[int, int, int]:
        self.pairs.pair_images(i)
        cache = self.pairs._source._cache
        return len(cache), cache.peak, pa.total_allocated_bytes()


def test_reader_holds_at_most_window_row_groups(tmp_path: Path) -> None:
    records = rows(120, repeat=None)
    for r in records:                         # ~20 KB per row (after the PNG's end), ~200 KB per row group
        r["jpg_0"] += bytes(20_000) + r["image_0_uid"].encode()
    folder = write_set(tmp_path / "set", records, splits=(40, 40), group_rows=10)
    ds = PreferencePairs(cfg(folder, shuffle_window=3))
    source = ds._source
    base = pa.total_allocated_bytes()
    order = ds.epoch_order(0, 0)
    probes = [_CacheProbe(ds)[int(i)] for i in order]
    assert max(p[0] for p in probes) == 3 and source._cache.peak == 3
    assert source._cache.loads == 12                                      # 12 row groups, each read once
    assert 2.5 * source.group_bytes < max(p[2] for p in probes) - base <= 3 * source.group_bytes + 64 * 1024
    batches = [order[k:k + 4].tolist() for k in range(0, len(order), 4)]
    fresh = PreferencePairs(cfg(folder, shuffle_window=3))
    loader = torch.utils.data.DataLoader(_CacheProbe(fresh), batch_sampler=batches, num_workers=2)
    assert max(int(peak.max()) for _, peak, _ in loader) == 3               # the bound holds in each worker
    assert len(fresh._source._cache) == 0                                 # the main process read nothing


# ------------------------------------------------------------------------------------------ fsspec URLs


def test_fsspec_url_reads_the_same_pairs_in_workers(tmp_path: Path) -> None:
    import fsspec

    folder = write_set(tmp_path / "set", rows())
    fs = fsspec.filesystem("memory")
    for f in folder.glob("*.parquet"):
        fs.pipe(f"/pickapic/data/{f.name}", f.read_bytes())
    fs.pipe("/pickapic/data/test-00000-of-00001.parquet", (folder / "train-00000-of-00004.parquet").read_bytes())
    try:
        remote, local = PreferencePairs(cfg("memory://pickapic/data")), PreferencePairs(cfg(folder))
        assert remote.stats == local.stats and len(remote) == 16
        same_pairs(remote._source, local._source)
        assert len(PreferencePairs(cfg("memory://pickapic/data", split="test"))) == 5
        loader = torch.utils.data.DataLoader(remote, batch_size=7, collate_fn=collate_pairs, num_workers=2)
        assert torch.equal(torch.cat([b["pixels"] for b in loader]),
                           torch.cat([collate_pairs([local[i] for i in range(k, min(k + 7, 16))])["pixels"]
                                      for k in (0, 7, 14)]))
        assert set(P.source_fingerprint(cfg("memory://pickapic/data"))["parquet"]) == {
            f"train-0000{k}-of-00004.parquet" for k in range(4)}
        with pytest.raises(DataError, match="memory://nowhere: no such file or folder"):
            PreferencePairs(cfg("memory://nowhere"))
    finally:
        fs.rm("/pickapic", recursive=True)


# ------------------------------------------------------------------------------------------ tar shards


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_tars(folder: Path, records: list[dict], per_shard: int = 8) -> list[Path]:
    """The rows as webdataset samples: KEY.json + KEY.jpg_0 + KEY.png_1 (any image extension), shards of
    ``per_shard`` samples; key = the row number."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, lo in enumerate(range(0, len(records), per_shard)):
        paths.append(folder / f"train-{k:06d}.tar")
        with tarfile.open(paths[-1], "w") as archive:
            for i, r in enumerate(records[lo:lo + per_shard], start=lo):
                meta = {key: r[key] for key in ("caption", "label_0", "image_0_uid", "image_1_uid")}
                add(archive, f"{i:06d}.json", json.dumps(meta).encode())
                add(archive, f"{i:06d}.jpg_0", r["jpg_0"])
                add(archive, f"{i:06d}.png_1", r["jpg_1"])
    return paths


def test_tar_shards_give_the_same_pairs_as_parquet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    records = rows()
    write_tars(tmp_path / "tars", records)
    parquet = PreferencePairs(cfg(write_parquet(tmp_path / "p.parquet", records), shuffle_window=2))
    for path in (tmp_path / "tars", tmp_path / "tars" / "train-{000000..000002}.tar", tmp_path / "tars" / "*.tar"):
        shards = PreferencePairs(cfg(path, shuffle_window=2))
        assert P.resolve_format(cfg(path)) == "webdataset" and shards.stats == parquet.stats
        same_pairs(shards._source, parquet._source)
    order = shards.epoch_order(0, 0)
    assert sorted(order.tolist()) == list(range(len(shards)))
    assert shards._source.blocks.tolist() == [0] * 6 + [1] * 7 + [2] * 3           # a block never spans shards
    from diffalign.data.check import check_pairs

    records[9]["jpg_0"] = b"broken"
    write_tars(tmp_path / "bad", records)
    report = check_pairs(cfg(tmp_path / "bad"), workers=2)
    assert report["unreadable_pairs"] == 1 and report["failures"][0]["row"] == 9
    assert (f"{tmp_path / 'bad'}: row 9 (train-000001.tar, key 000009): cannot read 000009.jpg_0: "
            "UnidentifiedImageError") in report["failures"][0]["error"]


def test_tar_layout_errors_name_the_shard_and_key(tmp_path: Path) -> None:
    def shard(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as archive:
            for member, data in members.items():
                add(archive, member, data)
        return path

    good = json.dumps({"caption": "c", "label_0": 1.0}).encode()
    path = shard("a.tar", {"k1.json": good, "k1.jpg_0": png(0, 0), "k1.jpg_1": png(0, 1), "k2.jpg_0": png(1, 0)})
    with pytest.raises(DataError, match=r"a.tar: key k2: no k2.json \(found jpg_0\)"):
        PreferencePairs(cfg(path))
    path = shard("b.tar", {"k1.json": b"{oops", "k1.jpg_0": png(0, 0)})
    with pytest.raises(DataError, match=r"b.tar: key k1: k1.json is not valid JSON"):
        PreferencePairs(cfg(path))
    path = shard("c.tar", {"k1.json": json.dumps({"label_0": 1}).encode()})
    with pytest.raises(DataError, match=r"c.tar: key k1: k1.json: missing key\(s\) caption; found keys: label_0"):
        PreferencePairs(cfg(path))
    path = shard("d.tar", {"k1.json": good, "k1.jpg_0": png(0, 0), "k1.png_0": png(0, 0)})
    with pytest.raises(DataError, match=r"d.tar: key k1: two members for the same part \(k1.jpg_0 and k1.png_0\)"):
        PreferencePairs(cfg(path))
    path = shard("e.tar", {"k1.json": good, "k1.jpg_0": png(0, 0), "README.txt": b"hi"})
    ds = PreferencePairs(cfg(path))
    with pytest.raises(BadImageError, match=r"row 0 \(e.tar, key k1\): cannot read image 1: the sample has no "
                                            r"k1.<image>_1 member"):
        ds[0]
    assert PreferencePairs(cfg(path, on_bad_image="skip_pair"))[0] is None
    path = shard("f.tar", {"k1.json": json.dumps({"caption": "c", "label_0": 0.5}).encode()})
    with pytest.raises(DataError, match=r"f.tar: row 0 \(f.tar, key k1\) is a tie"):
        PreferencePairs(cfg(path, ties="error"))
    with tarfile.open(tmp_path / "g.tar", "w:gz") as archive:
        add(archive, "k1.json", good)
    with pytest.raises(DataError, match=r"g.tar: not an uncompressed tar file"):
        PreferencePairs(cfg(tmp_path / "g.tar"))


def test_tar_index_is_cached_per_shard_and_rebuilt_when_the_shard_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from diffalign.data import tar

    monkeypatch.setenv("DIFFALIGN_CACHE", str(tmp_path / "cache"))
    records = rows()
    paths = write_tars(tmp_path / "tars", records)
    first = PreferencePairs(cfg(tmp_path / "tars"))
    assert len(list((tmp_path / "cache" / "tar_index").glob("*.json"))) == len(paths)

    opened = []
    real_open = tarfile.open
    def counting_open(*args, **kw):                        # the reader's header scans, not write_tars' writes
        if kw.get("mode") == "r:":
            opened.append(kw["fileobj"])
        return real_open(*args, **kw)

    monkeypatch.setattr(tar.tarfile, "open", counting_open)
    with caplog.at_level(logging.INFO, logger="diffalign"):
        again = PreferencePairs(cfg(tmp_path / "tars"))
    assert opened == [] and f"{len(paths)} from the index cache" in caplog.text    # no header was read
    assert again.stats == first.stats
    same_pairs(again._source, first._source)

    # a rewritten shard (other samples, so another size) is indexed again; the others still come from the cache
    records[0]["caption"], records[3]["label_0"] = "a longer caption than before", 0.5
    write_tars(tmp_path / "tars", records[:8])
    changed = PreferencePairs(cfg(tmp_path / "tars"))
    assert len(opened) == 1 and changed._source.prompt(0) == "a longer caption than before"
    assert changed.stats["ties_dropped"] == first.stats["ties_dropped"] + 1     # row 3 is a tie now

    # a damaged cache entry is read past with a warning, and replaced
    for entry in (tmp_path / "cache" / "tar_index").glob("*.json"):
        entry.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="diffalign"):
        rebuilt = PreferencePairs(cfg(tmp_path / "tars"))
    assert "is unreadable" in caplog.text and len(opened) == 1 + len(paths)
    assert rebuilt.stats == changed.stats
