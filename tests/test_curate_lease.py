"""The curation lease and the config a version is started with, on real Lance tables (no Ray)."""

import time

import pytest

from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from curation.lock import LOCK_TAG, CurateLock, OutputBusy
from curation.writer import create_tables
from pipelines.curate import ConfigDrift, _claim_version


@pytest.fixture
def dataset(tmp_path):
    dataset = CuratedDataset(str(tmp_path / "out"))
    create_tables(dataset)
    return dataset


def _foreign_lease(dataset: CuratedDataset, age_s: float) -> None:
    """A lease held by a run on another host whose last heartbeat was `age_s` ago."""
    videos = dataset.open("videos")
    videos.tags.create(LOCK_TAG, videos.version)
    videos.tags.replace_metadata(LOCK_TAG, {"host": "elsewhere-7", "pid": "4242", "started": "1.0",
                                            "heartbeat": f"{time.time() - age_s:.3f}"})


def test_a_live_lease_from_another_host_stops_the_run_naming_it(dataset):
    _foreign_lease(dataset, age_s=5)
    with pytest.raises(OutputBusy, match=r"pid 4242 on elsewhere-7, last heartbeat \d+ s ago"):
        CurateLock(dataset, timeout_s=60).acquire()
    assert dataset.open("videos").tags.list()[LOCK_TAG]["metadata"]["host"] == "elsewhere-7"  # untouched


def test_a_stale_lease_from_another_host_is_taken_over(dataset):
    _foreign_lease(dataset, age_s=120)
    with CurateLock(dataset, timeout_s=60) as lock:
        held = dataset.open("videos").tags.list()[LOCK_TAG]["metadata"]
        assert held["pid"] == lock.holder["pid"] and held["host"] == lock.holder["host"]
    assert LOCK_TAG not in dataset.open("videos").tags.list()


def test_the_heartbeat_moves_and_a_lost_lease_is_noticed(dataset):
    lock = CurateLock(dataset, timeout_s=60, heartbeat_s=0.2)
    lock.acquire()
    first = float(dataset.open("videos").tags.list()[LOCK_TAG]["metadata"]["heartbeat"])
    time.sleep(0.8)
    assert float(dataset.open("videos").tags.list()[LOCK_TAG]["metadata"]["heartbeat"]) > first
    dataset.open("videos").tags.delete(LOCK_TAG)  # another run judged it stale and took it
    _foreign_lease(dataset, age_s=0)
    time.sleep(0.8)
    with pytest.raises(OutputBusy, match="lost its lease"):
        lock.check()
    lock.release()
    assert dataset.open("videos").tags.list()[LOCK_TAG]["metadata"]["host"] == "elsewhere-7"  # not ours to remove


def test_an_unfinished_version_is_finished_only_under_the_config_that_started_it(dataset, tmp_path):
    config = CurateConfig(input="/dump", output=dataset.uri)
    _claim_version(config, dataset, 1)
    _claim_version(config, dataset, 1)  # the same config goes on
    assert (tmp_path / "out" / "config-v0001.yaml").is_file()
    changed = CurateConfig(input="/dump", output=dataset.uri)
    changed.shots.min_seconds = config.shots.min_seconds + 1.0
    with pytest.raises(ConfigDrift, match=r"version 1 .* another config .* config-v0001.yaml"):
        _claim_version(changed, dataset, 1)


def test_curate_refuses_an_unmigrated_parquet_output(tmp_path):
    from curation.dataset import DatasetError
    from pipelines.curate import run_curate

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text('{"versions": []}')
    with pytest.raises(DatasetError, match="reelforge migrate-dataset --data"):
        run_curate(CurateConfig(input=str(tmp_path), output=str(tmp_path / "old")))
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["manifest.json"]  # nothing written beside it


def test_a_tag_without_its_record_is_not_a_finished_version(dataset):
    """tag_version died between creating the videos tag and writing its record: readers do not see the version."""
    from curation.dataset import DatasetError

    videos = dataset.open("videos")
    videos.tags.create("v0001", videos.version)
    assert dataset.versions() == [] and dataset.latest() is None
    with pytest.raises(DatasetError, match=r"has no dataset version 1 \(versions: none\)"):
        dataset.read("videos", 1)


def test_how_a_run_is_run_does_not_change_its_config_hash():
    from pipelines.curate import config_sha256

    config = CurateConfig(input="/dump", output="/out")
    moved = CurateConfig(input="s3://bucket/dump", output="/out")
    moved.ray.address, moved.ray.num_cpus, moved.tracking.uri = "10.0.0.1:6379", 64, "http://mlflow:5000"
    moved.output_files.commit_videos, moved.clip_scores.num_gpus, moved.captions.batch_size = 128, 1.0, 64
    assert config_sha256(moved) == config_sha256(config)
    changed = CurateConfig(input="/dump", output="/out")
    changed.filters.motion_stat = "mean" if config.filters.motion_stat == "median" else "median"
    assert config_sha256(changed) != config_sha256(config)
