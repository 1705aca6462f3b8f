"""Curation against a hostile surrounding, on a real local Ray cluster (issue 13): kill -9 in the MLflow report and
between tagging a version and closing its run (the other phases are in tests/test_curate_ray.py), an output disk
that fills up mid-run (a small tmpfs the test mounts; skipped where mounting is not allowed), and a poison video
that fails every run with a run error."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_curate_ray import HELPER, _config, _crash
from test_curate_ray import _tables as _rows

from curation.dataset import CuratedDataset
from curation.video_stage import REPEATED
from pipelines import tracking
from pipelines.curate import RunErrors, run_curate

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _tables(out: Path, version: int | None = None) -> str:
    """The tables' rows as text, so that two reads compare equal where a score is NaN (NaN != NaN)."""
    return json.dumps(_rows(out, version), default=repr, sort_keys=True)


def _runs(out: Path) -> list:
    client = tracking.client_for(f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("reelforge-curate").experiment_id])


# The model stages are off: the phases around committing and closing the run are the subject, not the models.
LIGHT = ("captions.enabled=false", "clip_scores.enabled=false", "ocr.enabled=false")


@pytest.fixture(scope="module")
def small_dump(videos, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small-dump")
    for index, data in enumerate(videos):
        (root / f"v{index}.mp4").write_bytes(data)
    return root


def test_kill_minus_9_in_the_mlflow_report_then_rerun_finishes_in_the_same_run(small_dump, ray_cluster, tmp_path):
    crashed = tmp_path / "crashed"
    _crash("report", small_dump, crashed, ray_cluster.get_runtime_context().gcs_address, *LIGHT)
    dataset = CuratedDataset(str(crashed))
    assert dataset.latest() is None  # the version is tagged after its report
    committed = dataset.open("clips").to_table().to_pylist()
    [killed] = _runs(crashed)
    assert killed.info.status == "RUNNING" and killed.data.params  # params were logged, the files were not
    record = run_curate(_config(small_dump, crashed, *LIGHT))
    assert record["counts"]["videos"] == 3 and record["counts"]["clips"] == len(committed) > 0
    [run] = _runs(crashed)
    assert (run.info.run_id, run.info.status) == (killed.info.run_id, "FINISHED") == \
        (record["run"]["mlflow_run_id"], "FINISHED")
    client = tracking.client_for(f"sqlite:///{crashed / 'mlflow.db'}")
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")]  # the report made it this time


def test_kill_minus_9_after_the_version_is_tagged_then_rerun_closes_its_run(small_dump, ray_cluster, tmp_path):
    crashed = tmp_path / "crashed"
    _crash("finalize", small_dump, crashed, ray_cluster.get_runtime_context().gcs_address, *LIGHT)
    assert CuratedDataset(str(crashed)).latest() == 1  # the version is complete
    before = _tables(crashed)
    [dangling] = _runs(crashed)
    assert dangling.info.status == "RUNNING"
    record = run_curate(_config(small_dump, crashed, *LIGHT))
    assert record["run"]["nothing_new"] and record["counts"]["videos"] == 3
    assert _tables(crashed) == before
    [closed] = _runs(crashed)
    assert (closed.info.run_id, closed.info.status) == (dangling.info.run_id, "KILLED")
    assert "dataset version 1" in closed.data.tags[tracking.CLOSED_TAG]


def _noise_video(seed: int, seconds: float = 4.0, fps: int = 10, width: int = 160, height: int = 120) -> bytes:
    """An MP4 of moving noise: a few hundred KB that stay large when curation re-encodes its clips."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height * 2, width * 2, 3), dtype=np.uint8)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            frame = base[i % height: i % height + height, 2 * i % width: 2 * i % width + width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs the test mounts (and can fill); skipped where this process may not mount."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the disk."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * max(0, free - leave))
    return filler


def test_a_full_output_disk_fails_the_run_loses_nothing_and_a_rerun_with_space_finishes(ray_cluster, small_disk,
                                                                                        tmp_path):
    root = tmp_path / "dump"
    root.mkdir()
    for seed in range(2):
        (root / f"first-{seed}.mp4").write_bytes(_noise_video(seed))
    out = small_disk / "curated"
    sets = [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "output_files.commit_videos=1", *LIGHT]
    first = run_curate(_config(root, out, *sets))
    assert first["counts"]["videos_ok"] == 2
    version_1 = _tables(out, 1)
    for seed in range(2, 5):
        (root / f"second-{seed}.mp4").write_bytes(_noise_video(seed))

    filler = _fill(small_disk, leave=96 * 1024)  # room for the lease, not for a video's clips
    with pytest.raises(OSError, match="No space left on device|os error 28"):
        run_curate(_config(root, out, *sets))
    dataset = CuratedDataset(str(out))
    assert dataset.latest() == 1 and _tables(out, 1) == version_1  # nothing committed was lost
    statuses = {r["status"] for r in dataset.open("videos").to_table().to_pylist()}
    assert statuses == {"ok"}  # the disk's problem quarantined no video

    filler.unlink()  # space again: the rerun finishes the version with every new video
    second = run_curate(_config(root, out, *sets))
    assert second["dataset_version"] == 2 and second["counts"]["videos_ok"] == 3
    assert _tables(out, 1) == version_1
    assert {r["status"] for r in CuratedDataset(str(out)).read("videos").to_pylist()} == {"ok"}
    assert len(CuratedDataset(str(out)).read("videos").to_pylist()) == 5


def test_a_video_that_fails_every_run_is_quarantined_after_max_run_errors(videos, ray_cluster, tmp_path):
    root = tmp_path / "dump"
    root.mkdir()
    (root / "good.mp4").write_bytes(videos[0])
    (root / "poison.mp4").write_bytes(videos[1])
    out = tmp_path / "curated"
    sets = (f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "output_files.commit_videos=1",
            "output_files.max_run_errors=2", "decode.isolate=false", *LIGHT)
    address = ray_cluster.get_runtime_context().gcs_address
    for attempt in (1, 2):  # `reelforge curate` run twice: a run error fails the run; the video's count goes up
        proc = subprocess.run([sys.executable, str(HELPER), "poison", str(root), str(out), address, *sets],
                              env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 1 and "could not allocate" in proc.stderr, proc.stderr[-3000:]
        dataset = CuratedDataset(str(out))
        assert dataset.latest() is None
        counts = {k: json.loads(v)["runs"] for k, v in dataset.open("videos").config().items()
                  if k.startswith(RunErrors.PREFIX)}
        assert list(counts.values()) == [attempt]
        assert "poison.mp4" not in {os.path.basename(r["uri"]) for r in dataset.open("videos").to_table().to_pylist()}
    record = run_curate(_config(root, out, *sets))  # the third run: the poison file is quarantined first
    assert record["counts"]["quarantined"] == {REPEATED: 1}
    rows = {os.path.basename(r["uri"]): r for r in CuratedDataset(str(out)).read("videos").to_pylist()}
    assert rows["good.mp4"]["status"] == "ok"
    assert rows["poison.mp4"]["status"] == "quarantined" and rows["poison.mp4"]["error_class"] == REPEATED
    assert "2 runs failed" in rows["poison.mp4"]["error_message"]
    assert "MemoryError: the decoder could not allocate" in rows["poison.mp4"]["error_message"]
    assert not [k for k in CuratedDataset(str(out)).open("videos").config() if k.startswith(RunErrors.PREFIX)]
