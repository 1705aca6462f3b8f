"""Reruns on a growing dump with a real Ray cluster and a real MLflow SQLite store: only new (and, when asked,
quarantined) videos are processed, each run is one MLflow run with params, metrics, tags and the report."""

import shutil

import pytest
from PIL import Image

from curation.config import CurateConfig
from curation.dataset import CuratedDataset
from pipelines.config import load_config
from pipelines.curate import run_curate, summary_text

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _copy(src, dst, names):
    for name in names:
        for path in (src / name).parent.glob((src / name).stem + ".*"):  # the video and its sidecar caption
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


def _ids(dataset, version):
    """The videos a version processed: its rows that carry its number."""
    rows = dataset.read("videos", version, filter=f"dataset_version = {version}").to_pylist()
    return {r["video_id"]: r for r in rows}


def _name(row):
    return row["uri"].rsplit("/", 1)[-1]


def test_rerun_processes_only_new_and_retried_videos_and_logs_one_mlflow_run_each(sample_dump, ray_cluster, tmp_path,
                                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root, _ = sample_dump
    dump, out = tmp_path / "dump", tmp_path / "curated"
    _copy(root, dump, ["004_single.mp4", "more/011_single.mp4", "000_cuts_static.mp4", "bad_zero_bytes.mp4"])
    base = {"input": str(dump), "output": str(out)}
    # Version 1: the 9.9 s video is over the duration limit, so it is quarantined (as is the empty file).
    first = run_curate(load_config(CurateConfig, None, ["decode.max_duration_s=6"], base=base))
    dataset = CuratedDataset(str(out))
    assert first["dataset_version"] == 1 and dataset.latest() == 1
    v1 = _ids(dataset, 1)
    assert sorted((_name(r), r["status"], r["error_class"]) for r in v1.values()) == [
        ("000_cuts_static.mp4", "quarantined", "too_long"), ("004_single.mp4", "ok", None),
        ("011_single.mp4", "ok", None), ("bad_zero_bytes.mp4", "quarantined", "empty_file")]

    # The dump grows by one video; the limit is lifted and quarantined videos are retried.
    _copy(root, dump, ["002_fade.mp4"])
    config = load_config(CurateConfig, None, [], base=base)
    second = run_curate(config, retry_quarantined=True)
    assert second["dataset_version"] == 2 and dataset.latest() == 2
    entry = dataset.record(2)  # the record kept in the version's tag is what run_curate returned
    assert {k: entry[k] for k in ("counts", "run", "filters", "retried", "report", "config_sha256")} == \
        {k: second[k] for k in ("counts", "run", "filters", "retried", "report", "config_sha256")}
    v2 = _ids(dataset, 2)
    # Work proportional to what is new: the new video and the two retried ones were processed, nothing else.
    assert sorted(_name(r) for r in v2.values()) == ["000_cuts_static.mp4", "002_fade.mp4", "bad_zero_bytes.mp4"]
    assert entry["run"]["videos_processed"] == 3 and entry["counts"]["videos"] == 3
    assert entry["retried"] == sorted(i for i, r in v1.items() if r["status"] == "quarantined")
    assert next(r for r in v2.values() if _name(r) == "000_cuts_static.mp4")["status"] == "ok"
    assert "1 retried" not in summary_text(second) and "2 retried" in summary_text(second)

    # Readers see each video once, at its newest row (a retried video's row replaced its quarantined one); version 1
    # still reads as it was. The shards hold every kept clip exactly once.
    latest = dataset.read("videos").to_pylist()
    assert len(latest) == 5 and len({r["video_id"] for r in latest}) == 5
    assert {_name(r): r["status"] for r in latest}["000_cuts_static.mp4"] == "ok"
    old = dataset.read("videos", 1).to_pylist()
    assert len(old) == 4 and {_name(r): r["status"] for r in old}["000_cuts_static.mp4"] == "quarantined"
    shard_ids = dataset.read("shards", columns=["clip_id"])["clip_id"].to_pylist()
    kept = dataset.read("clips", columns=["clip_id"], filter="kept")["clip_id"].to_pylist()
    assert len(shard_ids) == len(set(shard_ids)) == len(kept) > 0 and set(shard_ids) == set(kept)
    assert len(dataset.read("shards", 1)) < len(shard_ids)

    # One MLflow run per version in sqlite:///OUTPUT/mlflow.db, named in the version's record.
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("reelforge-curate")
    runs = {r.info.run_id: r for r in client.search_runs([experiment.experiment_id])}
    run_ids = [dataset.record(1)["run"]["mlflow_run_id"], entry["run"]["mlflow_run_id"]]
    assert run_ids[0] == first["run"]["mlflow_run_id"]
    # A finished version's run is named in its record, not left as the "unfinished version" key.
    assert not [k for k in dataset.open("videos").config() if k.startswith("reelforge.mlflow_run.")]
    assert set(runs) == set(run_ids) and all(r.info.status == "FINISHED" for r in runs.values())
    run = runs[run_ids[1]]
    assert run.data.params["filters.motion.min"] == "0.5" and run.data.params["input"] == str(dump)
    assert runs[run_ids[0]].data.params["decode.max_duration_s"] == "6.0"
    metrics = run.data.metrics
    assert metrics["videos_read"] == 3 and metrics["videos_superseded"] == 2 and metrics["quarantined.empty_file"] == 1
    assert metrics["clips_kept"] == entry["counts"]["clips_kept"] and metrics["video_seconds_per_wall_second"] > 0
    assert metrics["clips_found"] == metrics["clips_kept"] + metrics["clips_dropped"]
    for name, count in entry["counts"]["drop_reasons"].items():
        assert metrics[f"dropped_by.{name}"] == count
    tags = run.data.tags
    assert tags["dataset_version"] == "2" and tags["output_uri"] == str(out) and tags["retry_quarantined"] == "true"
    assert tags["scores_untrained"] == str(entry["scores_untrained"]).lower()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert artifacts == {"report/histograms.png", "report/contact_sheet.png", "report/drop_reasons.md",
                         "report/drop_reasons.csv"}
    local = client.download_artifacts(run.info.run_id, "report/contact_sheet.png", str(tmp_path))
    with Image.open(local) as image:
        assert image.size[0] == 4 * 240
    assert all((out / p).is_file() for p in entry["report"])

    # Nothing new: no version, no MLflow run.
    again = run_curate(config)
    assert again["dataset_version"] == 2 and again["run"]["nothing_new"]
    assert dataset.latest() == 2 and len(client.search_runs([experiment.experiment_id])) == 2
