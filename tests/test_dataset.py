"""Replayable training reads (training/dataset.py) on small Lance curated datasets written here by the curation
writer (curation/writer.py): two dataset versions, clips too short for the stage, one clip whose bytes do not decode
and one dropped clip that never reaches the shards."""

from __future__ import annotations

import io
import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import pytest

from curation.config import CurateConfig, FilterConfig, ScoreFilter
from curation.dataset import CuratedDataset, DatasetError
from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version
from training.config import CurriculumStage, DataConfig
from training.data import SHARD_COLUMNS, decode_row
from training.dataset import ClipTable, StageLoader, StageSampler, _permutation, pin_version

STAGE = CurriculumStage(name="high", steps=10, num_frames=4, fps=4.0, size=8)
SHORT = {4, 11, 21}  # clips of 3 frames: too short for STAGE's 4
BAD = 7  # a clip whose bytes are not a video
DROPPED = 26  # a clip the filters dropped: in the clips table, never in the shards
VERSION_1 = range(20)  # clips of videos 0-4
VERSION_2 = range(20, 27)  # clips of videos 5 and 6
# Every run-wide filter off: the writer keeps every clip that was not dropped early.
KEEP_ALL = CurateConfig(filters=FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                                             caption_match=ScoreFilter()))


def _clip(n: int, num_frames: int) -> bytes:
    """Frame i of clip n: red 8 * i, green 9 * n, so a decoded frame says which clip and frame it came from."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(num_frames):
            rgb = np.zeros((24, 32, 3), np.uint8)
            rgb[..., 0], rgb[..., 1] = 8 * i, 9 * n
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _clip_row(n: int) -> dict:
    frames = 3 if n in SHORT else 8 + n % 9
    data = b"not a video at all" if n == BAD else _clip(n, frames)
    return {"clip_id": f"clip-{n:03d}", "video_id": f"video-{n // 4}", "start_frame": 0, "end_frame": frames - 1,
            "start_s": 0.0, "end_s": frames / 8, "num_frames": frames, "caption": f"caption {n}",
            "drop_reason": "duration(0.5<2)" if n == DROPPED else None, "width": 32, "height": 24,
            "video_bytes": data}


def _video_record(video: int, clips: list[int]) -> dict:
    """A finished video as the curate pipeline stages it: its videos row with its clips."""
    return {"video_id": f"video-{video}", "uri": f"/videos/{video}.mp4", "size_bytes": 1000, "status": "ok",
            "error_class": None, "error_message": None, "fps": 8.0, "width": 32, "height": 24, "duration_s": 2.0,
            "num_frames": 16, "clips": [_clip_row(n) for n in clips]}


def _write_version(root: Path, version: int, clips: range) -> None:
    """One dataset version the way `reelforge curate` writes it: batches of videos, the filters, the tags."""
    dataset = CuratedDataset(str(root))
    create_tables(dataset)
    committer = BatchCommitter(dataset, version, every=2)
    for video in sorted({n // 4 for n in clips}):
        committer.add(_video_record(video, [n for n in clips if n // 4 == video]))
    committer.flush()
    written = finish_filters(dataset, KEEP_ALL, version, [])
    tag_version(dataset, version, {"dataset_version": version, "counts": written.counts})


def _number(clip_id: str) -> int:
    return int(clip_id.removeprefix("clip-"))


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[str, dict]:
    """26 kept clips in two versions (20, then 6 more and a dropped one), and what version 1 read as before
    version 2 existed."""
    root = tmp_path_factory.mktemp("curated")
    _write_version(root, 1, VERSION_1)
    first = ClipTable.open(str(root))
    before = {"version": first.version, "metadata": first.metadata(), "rows": first.take(range(len(first)))}
    _write_version(root, 2, VERSION_2)
    return str(root), before


@pytest.fixture(scope="module")
def table(curated) -> ClipTable:
    return ClipTable.open(curated[0])


def _row_of(table: ClipTable, n: int) -> int:
    return table.metadata()["clip_id"].index(f"clip-{n:03d}")


def _config(**changes) -> DataConfig:
    return DataConfig(**{"cache": True, "prefetch_batches": 2, "windows_per_clip": 2, "decode_concurrency": 2,
                         **changes})


def test_take_returns_rows_in_the_requested_order(table):
    assert len(table) == 26 and table.number == 2
    assert table.version.startswith(f"v2-lance{table.lance_version}-") and len(table.version.split("-")[2]) == 12
    meta = table.metadata()
    assert set(meta) == {"clip_id", "num_frames", "fps", "caption", "width", "height"}
    assert sorted(map(_number, meta["clip_id"])) == list(range(26))  # every kept clip once, the dropped one not
    wanted = [25, 0, 13, 5, 13, 19]  # one asked twice
    rows = table.take(wanted)
    assert [r["clip_id"] for r in rows] == [meta["clip_id"][i] for i in wanted]
    assert all(list(r) == SHARD_COLUMNS for r in rows)
    assert all(r["caption"] == f"caption {_number(r['clip_id'])}" and r["fps"] == 8.0 for r in rows)
    assert table.take([]) == []
    with pytest.raises(IndexError, match="row 26 is out of range for a table of 26 rows"):
        table.take([0, 26])


def test_row_order_is_fixed_by_the_version(curated, table):
    again = ClipTable.open(curated[0])
    assert again.metadata() == table.metadata() and again.version == table.version
    scanned = table.shards.to_table(columns=["clip_id"])["clip_id"].to_pylist()
    assert scanned == table.metadata()["clip_id"]
    assert [r["clip_id"] for r in again.take(range(26))] == scanned


def test_take_from_many_threads_at_once(table):
    indices = [random.Random(k).randrange(len(table)) for k in range(64)]
    expected = [table.take([i])[0] for i in indices]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: table.take([i])[0], indices)) == expected


def test_a_past_version_reads_its_own_rows_after_a_new_one(curated, table):
    root, before = curated
    old = ClipTable.open(f"{root}@v1")
    assert old.number == 1 and len(old) == 20 and old.data_uri == f"{root}@v1"
    assert old.version == before["version"] != table.version
    assert old.metadata() == before["metadata"]
    assert old.take(range(20)) == before["rows"]
    assert sorted(map(_number, old.metadata()["clip_id"])) == list(VERSION_1)
    assert table.data_uri == f"{root}@v2"  # the newest version, named: workers and reproductions read these rows
    # A run that trained on version 1 reads the same batches from it whatever came after.
    loader_args = (STAGE, _config(cache=False), 0, 0, 1, 2)
    with StageLoader(old, *loader_args) as a, StageLoader(ClipTable.open(f"{root}@v1"), *loader_args) as b:
        for k in range(3):
            np.testing.assert_array_equal(a.batch(k)[0], b.batch(k)[0])


def test_a_uri_opens_the_same_table(curated, table):
    by_uri = ClipTable.open(f"file://{curated[0]}")
    assert by_uri.version == table.version and len(by_uri) == len(table)
    assert by_uri.take([3, 22]) == table.take([3, 22])
    assert by_uri.data_uri == f"file://{curated[0]}@v2"
    assert ClipTable.open(f"file://{curated[0]}@v1").version == curated[1]["version"]


def test_pin_version_names_a_version_in_paths_and_uris():
    assert pin_version("/data/cur", 3) == "/data/cur@v3"
    assert pin_version("/data/cur@v2", 3) == "/data/cur@v3"
    assert pin_version("s3://K:S@bucket/cur?endpoint_override=h:9000&scheme=http", 12) == \
        "s3://K:S@bucket/cur@v12?endpoint_override=h:9000&scheme=http"
    assert pin_version("s3://bucket/cur@v1?region=r", 2) == "s3://bucket/cur@v2?region=r"


def test_version_names_the_rows(curated, tmp_path):
    _write_version(tmp_path, 1, VERSION_1)  # the same clips, written again: other files
    other = ClipTable.open(str(tmp_path))
    assert other.version.startswith("v1-") and other.version != curated[1]["version"]


def test_bad_data_paths_give_one_line_errors(tmp_path, curated):
    def problem(data: str) -> str:
        with pytest.raises(DatasetError) as err:
            ClipTable.open(data)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "has no curated dataset (no videos.lance)" in problem(str(tmp_path / "missing"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    assert "reelforge migrate-dataset" in problem(str(legacy))
    assert problem(f"{curated[0]}@v9").endswith("has no dataset version 9 (versions: v1, v2)")
    unfinished = tmp_path / "unfinished"
    create_tables(CuratedDataset(str(unfinished)))
    assert "has no finished dataset version yet" in problem(str(unfinished))
    _write_version(tmp_path / "empty", 1, range(DROPPED, DROPPED + 1))  # its one clip was dropped
    assert problem(str(tmp_path / "empty")).endswith("dataset version 1 has no kept clips, so there is nothing to "
                                                     "read; curate more videos or relax the filters")


def test_clips_too_short_for_the_stage_are_left_out(table):
    sampler = StageSampler(table.metadata(), STAGE, 2, seed=0, rank=0, world_size=1, batch_size=1)
    numbers = {_number(table.metadata()["clip_id"][row]) for row, _ in sampler.items}
    assert numbers == set(range(26)) - SHORT
    assert len(sampler.items) > len(numbers)  # two windows for most clips
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
    bad = _row_of(table, BAD)
    clips = []
    for j, item in enumerate(loader.sampler.batch_items(k)):
        candidates = [item, *loader.sampler.substitutes(k, j)]
        row, window = next(c for c in candidates if c[0] != bad)
        clips.append(decode_row(table.take([row])[0], STAGE, 2)[window])
    return np.stack(clips)


def test_batches_hold_the_sampled_windows_and_skip_undecodable_rows(table, caplog):
    bad = _row_of(table, BAD)
    with StageLoader(table, STAGE, _config(), seed=0, rank=1, world_size=2, batch_size=3) as loader:
        with_bad = [k for k in range(2 * loader.batches_per_epoch)
                    if bad in {r for r, _ in loader.sampler.batch_items(k)}]
        assert with_bad
        with caplog.at_level(logging.WARNING, logger="reelforge.train.dataset"):
            for k in [0, *with_bad]:
                video, captions = loader.batch(k)
                assert video.shape == (3, 4, 8, 8, 3) and video.dtype == np.uint8 and len(captions) == 3
                np.testing.assert_array_equal(video, _expected(table, loader, k))
        assert "clip-007" in caplog.text
        green = video[..., 1].mean(axis=(1, 2, 3)) / 9  # the clip each one came from
        assert BAD not in np.round(green).astype(int).tolist()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_resumed_worker_gives_the_uninterrupted_batches(curated, table, rank):
    """Two workers; each restarts at micro-batch 9 (past the first epoch) in a fresh process's view: the table
    opened again, nothing cached, no prefetch. Batches 9.. equal the uninterrupted run's."""
    total, resume_at = 14, 9
    with StageLoader(table, STAGE, _config(), 3, rank, 2, 3) as whole:
        assert whole.batches_per_epoch < resume_at
        expected = [whole.batch(k) for k in range(total)]
    reopened = ClipTable.open(table.data_uri)
    with StageLoader(reopened, STAGE, _config(cache=False, prefetch_batches=0), 3, rank, 2, 3) as resumed:
        for k in [*range(resume_at, total), 2, 1]:  # then back to earlier batches, as a second resume would
            video, captions = resumed.batch(k)
            np.testing.assert_array_equal(video, expected[k][0])
            assert captions == expected[k][1]


def test_the_two_ranks_read_different_clips(table):
    with (StageLoader(table, STAGE, _config(), 3, 0, 2, 3) as zero, StageLoader(table, STAGE, _config(), 3, 1, 2, 3)
          as one):
        assert zero.batch(0)[1] != one.batch(0)[1]


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
