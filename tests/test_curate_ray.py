"""The curate workflow on a real local Ray cluster: the Lance tables and their version, reruns, kill -9 at every
phase of a run followed by a rerun, and two runs started together on one output."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation.config import CurateConfig
from curation.dataset import KEYS, KINDS, CuratedDataset
from curation.embedding_index import EmbeddingIndex
from curation.filters import STRUCTURAL, reason_filters
from pipelines.config import load_config
from pipelines.curate import run_curate, summary_text

pytestmark = [pytest.mark.slow, pytest.mark.ray]

HELPER = Path(__file__).parent / "crash_helpers.py"


def _tables(out, version=None) -> dict[str, list[dict]]:
    dataset = CuratedDataset(str(out))
    return {kind: sorted(dataset.read(kind, version).to_pylist(), key=lambda r: r[KEYS[kind]]) for kind in KINDS}


def _config(root, out, *sets: str) -> CurateConfig:
    return load_config(CurateConfig, None, ["output_files.commit_videos=4", *sets],
                       base={"input": str(root), "output": str(out)})


def test_curate_sample_dump_writes_tables_and_version_and_reruns_as_noop(sample_dump, ray_cluster, tmp_path):
    root, truth = sample_dump
    out = tmp_path / "curated"
    record = run_curate(_config(root, out))
    tables = _tables(out)
    videos = {r["uri"][len(str(root)) + 1:]: r for r in tables["videos"]}
    assert set(videos) == set(truth["videos"]) | set(truth["bad_files"])
    for name, video in truth["videos"].items():
        assert videos[name]["status"] == "ok" and len(videos[name]["cut_frames"]) == len(video["cuts"])
    for name, reasons in truth["bad_files"].items():
        assert videos[name]["status"] == "quarantined" and videos[name]["error_class"] in reasons
    # Every sample video has a sidecar, so every clip keeps a sidecar caption; the tiny models score every clip
    # that the early filters (the video stage's) kept, and none that they dropped (skip_dropped, the default).
    assert all(c["caption"] and c["caption_source"] == "sidecar" for c in tables["clips"])
    early = [bool(set(reason_filters(c["drop_reason"])) & set(STRUCTURAL)) for c in tables["clips"]]
    scored = [c["clip_embedding"] is not None and c["caption_match"] is not None for c in tables["clips"]]
    assert scored == [not e for e in early] and any(early) and any(scored)
    assert all(len(c["clip_embedding"]) == 64 for c, s in zip(tables["clips"], scored, strict=True) if s)
    untrained = "open_clip:tiny (untrained); aesthetic:random init (untrained)"
    assert {c["score_model"] for c, s in zip(tables["clips"], scored, strict=True) if s} == {untrained}
    # Every verdict is final; the shards hold exactly the kept clips, with their bytes.
    assert all(c["kept"] is not None for c in tables["clips"])
    kept = [c["clip_id"] for c in tables["clips"] if c["kept"]]
    assert [s["clip_id"] for s in tables["shards"]] == kept and kept
    assert all(s["video_bytes"] and s["kept"] for s in tables["shards"])
    assert {r["dataset_version"] for kind in KINDS for r in tables[kind]} == {1}
    # Version 1 is a tag on each table, whose record names the run and the config that made it.
    dataset = CuratedDataset(str(out))
    (version,) = dataset.versions()
    assert version.number == 1
    assert version.record["counts"]["clips_kept"] == len(kept) == record["counts"]["clips_kept"]
    assert version.record["run"]["mlflow_run_id"] == record["run"]["mlflow_run_id"]
    assert len(version.record["config_sha256"]) == 64 and (out / "config-v0001.yaml").is_file()
    for kind in KINDS:
        assert dataset.open(kind, 1).version == version.lance_versions[kind]
    assert "curate-lock" not in dataset.open("videos").tags.list()
    assert "videos quarantined: 4" in summary_text(record)
    # The kept clips' embeddings are in the vector index dedup queries: a clip is its own nearest neighbour.
    index = EmbeddingIndex(str(out / "embeddings.lance"))
    assert len(index) == len(kept) and index.dim == 64
    first = next(c for c in tables["clips"] if c["kept"])
    assert index.nearest(np.array([first["clip_embedding"]], np.float32), k=1)[0][0][0] == first["clip_id"]
    # A rerun on the same dump finds nothing new and commits nothing.
    before = {kind: dataset.open(kind).version for kind in KINDS}
    again = run_curate(_config(root, out))
    assert again["dataset_version"] == 1 and again["run"] == {"nothing_new": True}
    assert {kind: dataset.open(kind).version for kind in KINDS} == before


def _crash(phase: str, root, out, address: str, *sets: str) -> str:
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)  # the MLflow store defaults to OUTPUT/mlflow.db
    proc = subprocess.run([sys.executable, str(HELPER), phase, str(root), str(out), address, *sets], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]  # it died by SIGKILL at the phase, not by an error
    return proc.stderr


@pytest.mark.parametrize("phase", ["processing", "verdicts", "tags"])
def test_kill_minus_9_at_each_phase_then_rerun_gives_the_same_tables(phase, sample_dump, curated_sample,
                                                                     ray_cluster, tmp_path, caplog):
    """kill -9 while videos are being committed, after the verdicts, and between the tags; the rerun (same config)
    finishes the interrupted version into exactly the tables of an uninterrupted run, in the same MLflow run."""
    root, _ = sample_dump
    crashed = tmp_path / "crashed"
    _crash(phase, root, crashed, ray_cluster.get_runtime_context().gcs_address)
    dataset = CuratedDataset(str(crashed))
    assert dataset.latest() is None  # the interrupted version does not exist for readers
    committed = dataset.open("videos").count_rows()
    if phase == "processing":
        assert committed == 8  # two batches of 4; the rest was lost with the process, or never started
    else:
        assert committed == 16
    caplog.set_level("INFO")
    record = run_curate(_config(root, crashed))
    assert any(f"{committed} of them by an interrupted run" in m for m in caplog.messages), caplog.messages
    assert _tables(crashed) == _tables(curated_sample)
    assert record["counts"] == CuratedDataset(str(curated_sample)).record()["counts"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{crashed / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reelforge-curate").experiment_id])
    assert [(r.info.run_id, r.info.status) for r in runs] == [(record["run"]["mlflow_run_id"], "FINISHED")]


def test_a_second_run_on_a_busy_output_stops_naming_the_first(sample_dump, ray_cluster, tmp_path):
    """Two runs on one output: while one holds the lease, the other stops at once with a message that names it;
    nothing the first wrote is touched."""
    import socket

    from curation.lock import CurateLock, OutputBusy
    from curation.writer import create_tables

    root, _ = sample_dump
    out = tmp_path / "busy"
    dataset = CuratedDataset(str(out))
    create_tables(dataset)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a live process on this host
    try:
        lock = CurateLock(dataset, timeout_s=600)
        lock.holder["pid"] = str(holder.pid)
        with lock:
            with pytest.raises(OutputBusy, match=rf"being curated by another run \(pid {holder.pid} on "
                                                 rf"{socket.gethostname()}"):
                run_curate(_config(root, out))
        assert dataset.open("videos").count_rows() == 0
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone, its lease is taken over and the run goes on.
    lock = CurateLock(dataset, timeout_s=600)
    lock.holder["pid"] = str(holder.pid)
    lock.acquire()
    lock._stop.set()  # leave the dead holder's lease behind, as kill -9 would
    assert run_curate(_config(root, out))["dataset_version"] == 1


def test_two_curate_commands_started_together_end_consistent(sample_dump, curated_sample, ray_cluster, tmp_path):
    """The issue's own case: two `reelforge curate` runs started at once on one output. One makes version 1; the
    other either stops at once naming it, or (started after it finished) finds nothing new. The tables are those
    of a single run."""
    root, _ = sample_dump
    out = tmp_path / "together"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "pipelines.cli", "curate", "--input", str(root), "--output", str(out),
           "--set", "output_files.commit_videos=4"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 0], [0, 2]), [r[2][-2000:] for r in results]
    for code, stdout, stderr in results:
        if code == 2:
            busy = [line for line in stderr.splitlines() if line.startswith("reelforge curate: error:")]
            assert busy and "is being curated by another run (pid" in busy[0], stderr[-2000:]
        else:
            assert "dataset version 1" in stdout
    assert [v.number for v in CuratedDataset(str(out)).versions()] == [1]
    assert _tables(out) == _tables(curated_sample)
