"""The sandbox for native decoders: IsolatedWorker on real crashes and hangs, and VideoStage running through it."""

import math
import os
import shutil
import time
from pathlib import Path

import isolate_helpers as helpers
import psutil
import pyarrow as pa
import pytest

from curation.config import CurateConfig
from curation.discover import DiscoverStage
from curation.isolate import ChildCrashed, ChildTimedOut, IsolatedWorker
from curation.video_stage import VideoStage


def _is_live_child(pid: int) -> bool:
    """Whether `pid` is still a child of this process (a zombie counts: it was never reaped)."""
    return any(child.pid == pid for child in psutil.Process().children())


@pytest.fixture
def worker():
    with IsolatedWorker() as w:
        yield w


def test_results_come_from_one_reused_child_that_close_reaps(worker):
    assert worker.pid is None  # started lazily, on the first call
    assert worker.call(helpers.add, 2, 3) == 5
    pid = worker.call(helpers.child_pid)
    assert pid != os.getpid() and pid == worker.pid
    assert worker.call(helpers.child_pid) == pid
    worker.close()
    assert worker.pid is None and not _is_live_child(pid)
    assert worker.call(helpers.child_pid) != pid  # usable again after close()


def test_python_exceptions_keep_their_type_and_message_and_the_child(worker):
    pid = worker.call(helpers.child_pid)
    with pytest.raises(ValueError) as err:
        worker.call(helpers.raise_value_error, "bad frame 42")
    assert str(err.value) == "bad frame 42"
    assert "raise_value_error" in err.value.__notes__[0]  # the child's traceback, as a note
    # An exception that cannot be unpickled comes back as a RuntimeError carrying its traceback.
    with pytest.raises(RuntimeError, match="NeedsTwoArguments: lost in transit"):
        worker.call(helpers.raise_unpicklable, "lost in transit")
    with pytest.raises(RuntimeError, match="unpicklable_result cannot be pickled"):
        worker.call(helpers.unpicklable_result)
    assert worker.call(helpers.child_pid) == pid


def test_a_native_crash_is_reported_by_signal_and_the_next_call_gets_a_fresh_child(worker):
    pid = worker.call(helpers.child_pid)
    with pytest.raises(ChildCrashed, match="SIGSEGV") as err:
        worker.call(helpers.segfault)
    assert err.value.signal_name == "SIGSEGV" and err.value.exit_code < 0
    assert not _is_live_child(pid)
    new_pid = worker.call(helpers.child_pid)
    assert new_pid != pid
    with pytest.raises(ChildCrashed, match="exited with code 3") as err:
        worker.call(helpers.exit_with, 3)
    assert err.value.exit_code == 3 and err.value.signal_name is None
    assert worker.call(helpers.add, 1, 1) == 2


def test_a_call_past_its_timeout_kills_the_child_and_the_next_call_recovers(worker):
    pid = worker.call(helpers.child_pid)
    start = time.monotonic()
    with pytest.raises(ChildTimedOut, match="0.5 s"):
        worker.call(helpers.sleep, 60, timeout_s=0.5)
    assert time.monotonic() - start < 5
    assert not _is_live_child(pid)
    assert worker.call(helpers.sleep, 0.01, timeout_s=30) == 0.01
    assert worker.pid != pid


# --- VideoStage through the sandbox --------------------------------------------------------------------------------


def _batch(paths: list[Path]) -> pa.Table:
    rows = [{"uri": str(p), "size_bytes": p.stat().st_size} for p in paths]
    return DiscoverStage(CurateConfig().discover)(pa.Table.from_pylist(rows))


def _stage(isolate: bool, cls: type[VideoStage] = VideoStage, timeout_s: float = 600.0) -> VideoStage:
    config = CurateConfig()
    config.decode.isolate, config.decode.timeout_s = isolate, timeout_s
    stage = cls(config)
    stage.setup()
    return stage


def _comparable(value):
    """Rows with NaN scores never compare equal (NaN != NaN); this spells NaN out and leaves the rest exact."""
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _small_videos(root: Path, truth: dict, count: int) -> list[Path]:
    return sorted((root / name for name in truth["videos"]), key=lambda p: p.stat().st_size)[:count]


def test_isolated_rows_equal_in_process_rows(sample_dump):
    root, truth = sample_dump
    paths = _small_videos(root, truth, 3) + [root / name for name in sorted(truth["bad_files"])]
    batch = _batch(paths)
    isolated = _stage(isolate=True)
    here = _stage(isolate=False)
    try:
        rows = isolated(batch).to_pylist()
        assert isolated._worker.pid != os.getpid()  # it did run in a child
    finally:
        isolated.close()
    expected = here(batch).to_pylist()
    assert [r["status"] for r in expected] == ["ok"] * 3 + ["quarantined"] * len(truth["bad_files"])
    assert any(c["video_bytes"] for r in expected for c in r["clips"])  # encoded clips are compared too
    assert _comparable(rows) == _comparable(expected)


class CrashingStage(VideoStage):
    child_entry = staticmethod(helpers.process_crashing_on_marked_files)


def test_a_crashing_or_hanging_decoder_quarantines_only_its_file(sample_dump, tmp_path):
    root, truth = sample_dump
    first, second = _small_videos(root, truth, 2)
    crash, hang = tmp_path / f"crash-{first.name}", tmp_path / f"hang-{first.name}"
    shutil.copy(first, crash)
    shutil.copy(first, hang)
    stage = _stage(isolate=True, cls=CrashingStage, timeout_s=2.0)
    try:
        rows = stage(_batch([first, crash, second, hang, first])).to_pylist()
    finally:
        stage.close()
    assert [r["status"] for r in rows] == ["ok", "quarantined", "ok", "quarantined", "ok"]
    assert rows[1]["error_class"] == "decoder_crash" and rows[1]["clips"] == []
    assert rows[1]["error_message"] == "the decoding process died with SIGSEGV; the file is quarantined"
    assert rows[3]["error_class"] == "decode_timeout" and "decode.timeout_s=2s" in rows[3]["error_message"]
    for row, path in [(rows[0], first), (rows[2], second), (rows[4], first)]:
        assert row["num_frames"] == truth["videos"][str(path.relative_to(root))]["num_frames"] and row["clips"]
    assert _comparable(rows[4]) == _comparable(rows[0])  # a fresh child after the crash gives the same row
