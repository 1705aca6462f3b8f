"""The curate workflow on a real local Ray cluster: outputs, manifest, reruns, and resume after kill -9."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from curation.config import CurateConfig
from pipelines.config import load_config
from pipelines.curate import run_curate, summary_text

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _tables(out):
    tables = {}
    for kind in ("videos", "clips", "shards"):
        files = sorted((out / kind).glob("*.parquet"))
        rows = [r for f in files for r in pq.read_table(f).to_pylist()]
        tables[kind] = sorted(rows, key=lambda r: (r["video_id"], r.get("start_frame", 0)))
    return tables


def test_curate_sample_dump_writes_tables_manifest_and_reruns_as_noop(sample_dump, ray_cluster, tmp_path):
    root, truth = sample_dump
    out = tmp_path / "curated"
    config = load_config(CurateConfig, None, ["output_files.shard_rows=4"], base={"input": str(root),
                                                                                  "output": str(out)})
    manifest = run_curate(config)
    tables = _tables(out)
    videos = {r["uri"][len(str(root)) + 1:]: r for r in tables["videos"]}
    assert set(videos) == set(truth["videos"]) | set(truth["bad_files"])
    for name, video in truth["videos"].items():
        assert videos[name]["status"] == "ok" and len(videos[name]["cut_frames"]) == len(video["cuts"])
    for name, reasons in truth["bad_files"].items():
        assert videos[name]["status"] == "quarantined" and videos[name]["error_class"] in reasons
    # Every sample video has a sidecar, so every clip keeps a sidecar caption; the tiny models score every clip.
    assert all(c["caption"] and c["caption_source"] == "sidecar" for c in tables["clips"])
    assert all(len(c["clip_embedding"]) == 64 and c["caption_match"] is not None for c in tables["clips"])
    untrained = "open_clip:tiny (untrained); aesthetic:random init (untrained)"
    assert {c["score_model"] for c in tables["clips"]} == {untrained}
    kept = [c for c in tables["clips"] if c["kept"]]
    assert len(tables["shards"]) == len(kept) > 0
    assert all(s["video_bytes"] for s in tables["shards"])
    assert max(pq.read_metadata(f).num_rows for f in (out / "shards").glob("*.parquet")) <= 4
    # The manifest lists every file with its row count and checksum.
    for entry in manifest["files"]:
        data = (out / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert pq.read_metadata(out / entry["path"]).num_rows == entry["rows"]
    assert json.loads((out / "manifest.json").read_text())["counts"]["clips_kept"] == len(kept)
    assert (out / "config-v0001.yaml").is_file() and not list((out / "_staging").iterdir())
    assert "videos quarantined: 4" in summary_text(manifest)
    # A rerun on the same dump finds nothing new and rewrites nothing.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = run_curate(config)
    assert again["dataset_version"] == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before


def _curate_cmd(root, out):
    return [sys.executable, "-m", "pipelines.cli", "curate", "--input", str(root), "--output", str(out),
            "--set", "ray.address=local", "--set", "ray.num_cpus=2", "--set", "ray.video_workers=1"]


def test_kill_minus_9_then_rerun_gives_the_same_tables(sample_dump, tmp_path):
    root, _ = sample_dump
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("MLFLOW_TRACKING_URI", None)  # the MLflow store defaults to OUTPUT/mlflow.db
    clean = tmp_path / "clean"
    subprocess.run(_curate_cmd(root, clean), check=True, env=env, capture_output=True, timeout=600)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_curate_cmd(root, crashed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    staging = crashed / "_staging"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(staging.glob("*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray cluster die at once
    proc.wait()
    # Ray's own daemons are not all in the driver's process group: a worker may finish one more atomic write
    # before it notices its raylet is gone. Count once the staging directory has stopped changing.
    staged, stable_since = -1, time.time()
    while time.time() - stable_since < 2.0:
        count = len(list(staging.glob("*.parquet")))
        if count != staged:
            staged, stable_since = count, time.time()
        time.sleep(0.1)
    assert staged >= 3 and not (crashed / "manifest.json").exists()
    result = subprocess.run(_curate_cmd(root, crashed), check=True, env=env, capture_output=True, text=True,
                            timeout=600)
    summary_line = [line for line in result.stderr.splitlines() if "new videos to process" in line]
    assert summary_line and f"{staged} staged by an interrupted run" in summary_line[0], summary_line
    resumed, reference = _tables(crashed), _tables(clean)
    assert resumed["videos"] == reference["videos"] and resumed["clips"] == reference["clips"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "video_bytes"} for r in rows]  # noqa: E731
    assert strip(resumed["shards"]) == strip(reference["shards"])
    for a, b in zip(resumed["shards"], reference["shards"], strict=True):
        assert _frame_count(a["video_bytes"]) == _frame_count(b["video_bytes"]) == a["num_frames"]
    # The encoder is configured to be deterministic, so the resumed shards are byte for byte the same.
    assert resumed["shards"] == reference["shards"]
    # The rerun finished the interrupted invocation's MLflow run instead of opening a second one.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{crashed / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reelforge-curate").experiment_id])
    manifest = json.loads((crashed / "manifest.json").read_text())
    assert [(r.info.run_id, r.info.status) for r in runs] == [(manifest["run"]["mlflow_run_id"], "FINISHED")]


def _frame_count(data: bytes) -> int:
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        return sum(1 for _ in container.decode(video=0))
