"""Replayable training reads (training/dataset.py) on a small curated dataset written here: two manifest versions,
shards of several row groups, clips too short for the stage and one clip whose bytes do not decode."""

from __future__ import annotations

import hashlib
import io
import logging

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.outputs import OutputDir, VersionWrite, commit_version
from training.config import CurriculumStage, DataConfig
from training.data import decode_row
from training.dataset import ClipTable, StageLoader, StageSampler, _permutation

STAGE = CurriculumStage(name="high", steps=10, num_frames=4, fps=4.0, size=8)
SHORT = {4, 11, 21}  # rows of 3 frames: too short for STAGE's 4
BAD = 7  # a row whose bytes are not a video


def _clip(row: int, num_frames: int) -> bytes:
    """Frame i of row r: red 8 * i, green 9 * r, so a decoded frame says which row and frame it came from."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(num_frames):
            rgb = np.zeros((24, 32, 3), np.uint8)
            rgb[..., 0], rgb[..., 1] = 8 * i, 9 * row
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _shard_row(row: int) -> dict:
    frames = 3 if row in SHORT else 8 + row % 9
    data = b"not a video at all" if row == BAD else _clip(row, frames)
    return {"clip_id": f"clip-{row:03d}", "video_id": f"video-{row // 4}", "num_frames": frames, "kept": True,
            "caption": f"caption {row}", "fps": 8.0, "width": 32, "height": 24, "video_bytes": data}


def _write_version(out: OutputDir, version: int, shards: list[list[dict]], previous: dict | None) -> dict:
    files = []
    out.makedirs("shards")
    for n, rows in enumerate(shards):
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows, schema=schema.SHARDS), sink, row_group_size=4)
        data = sink.getvalue().to_pybytes()
        rel = f"shards/v{version:04d}-{n:05d}.parquet"
        out.write_bytes_atomic(rel, data)
        files.append({"path": rel, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()})
    written = VersionWrite(version=version, config_path=f"config-v{version:04d}.yaml",
                           files={"videos": [], "clips": [], "shards": files}, counts={}, bounds=[],
                           untrained=False, warnings=[], superseded=[], staged=[])
    return commit_version(out, written, {}, previous, {})


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> str:
    """26 rows: version 1 has shards of 10 and 10 rows, version 2 one of 6 and an empty one."""
    root = tmp_path_factory.mktemp("curated")
    out = OutputDir(str(root))
    rows = [_shard_row(r) for r in range(26)]
    manifest = _write_version(out, 1, [rows[:10], rows[10:20]], None)
    _write_version(out, 2, [rows[20:], []], manifest)
    return str(root)


@pytest.fixture(scope="module")
def table(curated) -> ClipTable:
    return ClipTable.open(curated)


def _config(**changes) -> DataConfig:
    return DataConfig(**{"cache": True, "prefetch_batches": 2, "windows_per_clip": 2, "decode_concurrency": 2,
                         **changes})


def test_take_returns_rows_in_the_requested_order(table):
    assert len(table) == 26
    assert table.version.startswith("v2-") and len(table.version) == len("v2-") + 12
    wanted = [25, 0, 13, 5, 13, 19]  # across files, row groups and versions, one asked twice
    rows = table.take(wanted)
    assert [r["clip_id"] for r in rows] == [f"clip-{r:03d}" for r in wanted]
    assert set(rows[0]) == {"clip_id", "caption", "fps", "num_frames", "video_bytes"}
    meta = table.metadata()
    assert set(meta) == {"clip_id", "num_frames", "fps", "caption"}
    assert meta["clip_id"] == [f"clip-{r:03d}" for r in range(26)] and meta["caption"][3] == "caption 3"
    with pytest.raises(IndexError):
        table.take([26])


def test_a_uri_opens_the_same_table(curated, table):
    by_uri = ClipTable.open(f"file://{curated}")
    assert by_uri.version == table.version and len(by_uri) == len(table)
    assert by_uri.take([3, 22]) == table.take([3, 22])


def test_version_names_the_rows(curated, tmp_path):
    out = OutputDir(str(tmp_path))
    _write_version(out, 1, [[_shard_row(r) for r in range(20)]], None)
    other = ClipTable.open(str(tmp_path))
    assert other.version.startswith("v1-") and other.version != ClipTable.open(curated).version


def test_bad_data_paths_give_one_line_errors(tmp_path, curated):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        ClipTable.open(str(tmp_path / "missing"))
    _write_version(OutputDir(str(tmp_path / "empty")), 1, [[]], None)
    with pytest.raises(ValueError, match="no kept clips"):
        ClipTable.open(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    _write_version(OutputDir(str(broken)), 1, [[_shard_row(0)], [_shard_row(1)]], None)
    (broken / "shards" / "v0001-00001.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="v0001-00001.parquet listed in manifest.json is missing"):
        ClipTable.open(str(broken))


def test_clips_too_short_for_the_stage_are_left_out(table):
    sampler = StageSampler(table.metadata(), STAGE, 2, seed=0, rank=0, world_size=1, batch_size=1)
    rows = {row for row, _ in sampler.items}
    assert rows == set(range(26)) - SHORT
    assert len(sampler.items) > len(rows)  # two windows for most clips
    with pytest.raises(ValueError, match="lower deepspeed.micro_batch_size or scaling.num_workers"):
        StageSampler(table.metadata(), CurriculumStage(num_frames=40), 1, 0, 0, 2, 4)


def test_ranks_split_each_epoch_into_disjoint_equal_slices(table):
    world, batch = 2, 3
    samplers = [StageSampler(table.metadata(), STAGE, 2, 0, rank, world, batch) for rank in range(world)]
    per_epoch = samplers[0].batches_per_epoch
    total = len(samplers[0].items)
    assert per_epoch == total // world // batch and per_epoch > 1
    for epoch in range(2):
        seen = [[item for k in range(epoch * per_epoch, (epoch + 1) * per_epoch) for item in s.batch_items(k)]
                for s in samplers]
        assert all(len(s) == per_epoch * batch for s in seen)
        assert not set(seen[0]) & set(seen[1])
        together = set(seen[0]) | set(seen[1])
        assert together <= set(samplers[0].items) and total - len(together) < world * batch  # the dropped rest
        order = samplers[0].epoch_order(epoch)
        assert together == {samplers[0].items[i] for i in order[:world * per_epoch * batch]}


def test_orders_depend_on_seed_and_epoch_only(table):
    def batches(seed: int, epoch: int) -> list:
        s = StageSampler(table.metadata(), STAGE, 2, seed, 0, 1, 4)
        return [s.batch_items(k) for k in range(epoch * s.batches_per_epoch, (epoch + 1) * s.batches_per_epoch)]

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(1, 0)
    assert batches(0, 0) != batches(0, 1)
    s = StageSampler(table.metadata(), STAGE, 2, 0, 0, 1, 4)
    for epoch in range(3):  # one permutation of every item per epoch
        assert sorted(s.epoch_order(epoch).tolist()) == list(range(len(s.items)))
    # Pinned: a change of the order function changes the batches of every run resumed across it.
    assert _permutation(0, CurriculumStage(name="high"), 0, 12).tolist() == [11, 10, 1, 3, 7, 0, 8, 9, 5, 2, 6, 4]
    renamed = StageSampler(table.metadata(), CurriculumStage(name="low", num_frames=4, fps=4.0), 2, 0, 0, 1, 4)
    assert [renamed.batch_items(k) for k in range(3)] != batches(0, 0)[:3]


def _expected(table: ClipTable, loader: StageLoader, k: int) -> np.ndarray:
    """Micro-batch k decoded one row at a time, substitutes found by hand."""
    clips = []
    for j, item in enumerate(loader.sampler.batch_items(k)):
        candidates = [item, *loader.sampler.substitutes(k, j)]
        row, window = next(c for c in candidates if c[0] != BAD)
        clips.append(decode_row(table.take([row])[0], STAGE, 2)[window])
    return np.stack(clips)


def test_batches_hold_the_sampled_windows_and_skip_undecodable_rows(table, caplog):
    with StageLoader(table, STAGE, _config(), seed=0, rank=1, world_size=2, batch_size=3) as loader:
        with_bad = [k for k in range(2 * loader.batches_per_epoch) if BAD in {r for r, _ in
                                                                                loader.sampler.batch_items(k)}]
        assert with_bad
        with caplog.at_level(logging.WARNING, logger="reelforge.train.dataset"):
            for k in [0, *with_bad]:
                video, captions = loader.batch(k)
                assert video.shape == (3, 4, 8, 8, 3) and video.dtype == np.uint8 and len(captions) == 3
                np.testing.assert_array_equal(video, _expected(table, loader, k))
        assert "clip-007" in caplog.text
        green = video[..., 1].mean(axis=(1, 2, 3)) / 9  # the row each clip came from
        assert BAD not in np.round(green).astype(int).tolist()


def test_a_resumed_loader_gives_the_uninterrupted_batches(table):
    total, resume_at = 14, 9  # past the end of the first epoch
    with StageLoader(table, STAGE, _config(), 3, 0, 2, 3) as whole:
        assert whole.batches_per_epoch < resume_at
        expected = [whole.batch(k) for k in range(total)]
    with StageLoader(table, STAGE, _config(cache=False, prefetch_batches=0), 3, 0, 2, 3) as resumed:
        for k in [*range(resume_at, total), 2, 1]:  # then back to earlier batches, as a second resume would
            video, captions = resumed.batch(k)
            np.testing.assert_array_equal(video, expected[k][0])
            assert captions == expected[k][1]


def test_cache_on_and_off_give_the_same_batches(table):
    with (StageLoader(table, STAGE, _config(cache=True), 5, 0, 1, 4) as cached,
          StageLoader(table, STAGE, _config(cache=False, decode_concurrency=1), 5, 0, 1, 4) as uncached):
        ks = list(range(2 * cached.batches_per_epoch + 1))
        for k in ks:  # the second epoch comes from the warm cache
            a, b = cached.batch(k), uncached.batch(k)
            np.testing.assert_array_equal(a[0], b[0])
            assert a[1] == b[1]
        assert len(cached._rows) == len({r for r, _ in cached.sampler.items})  # every row decoded once, kept
        assert len(uncached._rows) <= 4 * 3  # only what the prefetched batches need
