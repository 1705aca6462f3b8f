"""Hostile videos and a hostile machine around the decode stage (issue 13, item 5): lying headers are rejected before
the first frame is decoded, frozen timestamps cannot pile frames into one clip, an error of the run fails the task
instead of quarantining a good file, the time limit grows with the video, and a killed child leaves no copy behind.

The files are real and made here (PyAV, then a few header bytes edited), so the truth is known by construction."""

from __future__ import annotations

import errno
import io
import os
import struct
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pytest

from curation.config import CurateConfig, DecodeConfig
from curation.decode import VideoInfo, is_run_error
from curation.discover import DiscoverStage
from curation.encode import ClipEncoder
from curation.isolate import ChildCrashed, ChildTimedOut, IsolatedWorker, set_time_limit
from curation.video_stage import VideoStage, _process_in_child, decode_time_limit

# --- files made here ------------------------------------------------------------------------------------------------


def _raw_avi(frames: int = 10, width: int = 64, height: int = 48) -> bytes:
    """Uncompressed AVI: its picture size, frame count and rate are plain little-endian fields of the header."""
    out = io.BytesIO()
    with av.open(out, "w", format="avi") as container:
        stream = container.add_stream("rawvideo", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr24"
        for i in range(frames):
            picture = np.full((height, width, 3), i * 20, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="bgr24")))
        container.mux(stream.encode())
    return out.getvalue()


def _lying_avi(width: int = 64, height: int = 48, frames: int | None = None, rate: int | None = None) -> bytes:
    """A real 64x48, 10-frame AVI whose header declares another size, frame count or rate."""
    data = bytearray(_raw_avi())
    avih, strh, strf = data.find(b"avih") + 8, data.find(b"strh") + 8, data.find(b"strf") + 8
    struct.pack_into("<ii", data, strf + 4, width, -height)  # BITMAPINFOHEADER biWidth, biHeight (top-down)
    struct.pack_into("<II", data, avih + 32, width, height)  # MainAVIHeader dwWidth, dwHeight
    if frames is not None:
        struct.pack_into("<I", data, strh + 32, frames)  # AVIStreamHeader dwLength
        struct.pack_into("<I", data, avih + 16, frames)  # MainAVIHeader dwTotalFrames
    if rate is not None:
        struct.pack_into("<I", data, strh + 24, rate)  # AVIStreamHeader dwRate (dwScale stays 1)
    return bytes(data)


def _mp4_with_frame_delta(delta: int, frames: int = 60, fps: int = 10) -> bytes:
    """A real H.264 MP4 (no B-frames) whose every frame lasts `delta` ticks (0: every timestamp is the first
    frame's), while the track header still says `frames / fps` seconds."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"bf": "0"}
        for i in range(frames):
            rgb = np.zeros((64, 96, 3), np.uint8)
            rgb[20:36, (i * 3) % 80:(i * 3) % 80 + 16] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(out.getvalue())
    stts = data.find(b"stts")
    count, sample_count, sample_delta = struct.unpack_from(">III", data, stts + 8)
    assert count == 1 and sample_count == frames  # one (count, delta) entry: every frame lasts the same
    struct.pack_into(">I", data, stts + 16, delta)
    return bytes(data)


def _batch(paths: list[Path]) -> pa.Table:
    rows = [{"uri": str(p), "size_bytes": p.stat().st_size} for p in paths]
    return DiscoverStage(CurateConfig().discover)(pa.Table.from_pylist(rows))


def _stage(config: CurateConfig | None = None, isolate: bool = False, cls: type[VideoStage] = VideoStage):
    config = config or CurateConfig()
    config.decode.isolate = isolate
    stage = cls(config)
    stage.setup()
    return stage


def _row(stage: VideoStage, path: Path) -> dict:
    return stage(_batch([path])).to_pylist()[0]


# --- lying headers --------------------------------------------------------------------------------------------------


def test_a_header_declaring_a_huge_picture_is_rejected_before_the_first_frame_is_decoded(tmp_path):
    path = tmp_path / "huge.avi"
    path.write_bytes(_lying_avi(width=9000, height=6000))  # packets hold 64x48 pictures
    row = _row(_stage(), path)
    assert row["status"] == "quarantined" and row["clips"] == []
    assert row["error_class"] == "resolution_too_large"  # not "no_decodable_frames": no decode was tried
    assert "declared 9000x6000" in row["error_message"] and "decode.max_side=8192" in row["error_message"]


def test_a_header_declaring_a_huge_frame_count_is_rejected_before_the_first_frame_is_decoded(tmp_path):
    # 2,000,000 frames at 200 fps (10000 s, under the duration limit), and a width whose packets do not decode.
    path = tmp_path / "many.avi"
    path.write_bytes(_lying_avi(width=66, frames=2_000_000, rate=200))
    row = _row(_stage(), path)
    assert row["error_class"] == "too_many_frames"
    assert "2000000 frames declared" in row["error_message"] and "decode.max_frames=1000000" in row["error_message"]


def test_the_unedited_avi_decodes(tmp_path):
    """The control for the two above: the same file with its true header is a good video."""
    path = tmp_path / "true.avi"
    path.write_bytes(_lying_avi())
    row = _row(_stage(), path)
    assert row["status"] == "ok" and row["num_frames"] == 10 and (row["width"], row["height"]) == (64, 48)


# --- frozen and crawling timestamps ---------------------------------------------------------------------------------


def test_frozen_timestamps_quarantine_the_file(tmp_path):
    path = tmp_path / "frozen.mp4"
    path.write_bytes(_mp4_with_frame_delta(0))
    with av.open(str(path)) as container:  # the truth: all 60 frames at one instant
        assert {f.pts for f in container.decode(video=0)} == {0}
    row = _row(_stage(), path)
    assert row["status"] == "quarantined" and row["error_class"] == "bad_timestamps" and row["clips"] == []
    assert "after frame 0 (0.000s): 17 frames in a row" in row["error_message"]
    assert "decode.max_stalled_frames=16" in row["error_message"]


def test_a_clip_never_holds_more_frames_than_its_window_when_timestamps_stop(tmp_path):
    path = tmp_path / "frozen.mp4"
    path.write_bytes(_mp4_with_frame_delta(0))
    config = CurateConfig()
    config.decode.max_stalled_frames = 1000  # tolerate the frozen run: the clip bound must hold on its own
    config.shots.max_seconds = 1.0  # 10 frames at the declared 10 fps; the cap is twice that
    row = _row(_stage(config), path)
    assert row["status"] == "ok" and row["num_frames"] == 60
    sizes = [c["num_frames"] for c in row["clips"]]
    assert sizes and max(sizes) <= 20, sizes  # the old code made one clip of every frame
    assert sum(sizes) >= 40  # the frames are still cut into clips, not lost


# --- errors of the run are not quarantines --------------------------------------------------------------------------

_RUN_ERRORS = {
    "disk full": OSError(errno.ENOSPC, "No space left on device"),
    "quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "memory": MemoryError(),
    "throttled": OSError("When reading information for key 'v.mp4' in bucket 'dump': AWS Error SLOW_DOWN during "
                         "GetObject operation: Please reduce your request rate."),
    "connection": OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was "
                          "reached"),
}


@pytest.mark.parametrize("name", sorted(_RUN_ERRORS))
def test_an_error_of_the_run_fails_the_task_and_records_nothing(name, videos, tmp_path, monkeypatch):
    """The real decoder runs; the clip encoder's output step then fails as a full disk or the store would."""
    path = tmp_path / "good.mp4"
    path.write_bytes(videos[0])
    error = _RUN_ERRORS[name]

    def fail(self):
        raise error

    monkeypatch.setattr(ClipEncoder, "close", fail)
    stage = _stage()
    with pytest.raises(type(error)) as raised:
        stage(_batch([path]))  # no row comes back, so no completion record is staged and a rerun retries it
    assert raised.value is error
    monkeypatch.undo()
    assert _row(stage, path)["status"] == "ok"  # the rerun, on a healthy machine


def test_errors_are_classified_by_what_they_say_about_the_file_or_the_run():
    for error in _RUN_ERRORS.values():
        assert is_run_error(error), error
    for error in [ValueError("bad frame"), OSError(errno.ENOENT, "gone"), KeyError("x"),
                  OSError("AWS Error ACCESS_DENIED during GetObject operation"), av.error.InvalidDataError(1, "x"),
                  OSError("When reading information for key 'connection timed out.mp4' in bucket 'throttled': AWS "
                          "Error ACCESS_DENIED during HeadObject operation")]:
        assert not is_run_error(error), error


def process_with_a_full_disk(config, video_id: str, uri: str, size: int) -> dict:
    """VideoStage's child entry, except that the disk is full when the first clip is written out."""

    def fail(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    ClipEncoder.close = fail  # only in this test's own child process
    return _process_in_child(config, video_id, uri, size)


class FullDiskStage(VideoStage):
    child_entry = staticmethod(process_with_a_full_disk)


def test_an_error_of_the_run_in_the_sandbox_reaches_the_caller(videos, tmp_path):
    path = tmp_path / "good.mp4"
    path.write_bytes(videos[1])
    stage = _stage(isolate=True, cls=FullDiskStage)
    try:
        with pytest.raises(OSError) as raised:
            stage(_batch([path]))
    finally:
        stage.close()
    assert raised.value.errno == errno.ENOSPC


# --- a time limit that grows with the video -------------------------------------------------------------------------


def _info(duration_s: float | None, num_frames: int = 0, fps: float = 30.0) -> VideoInfo:
    return VideoInfo(width=1280, height=720, fps=fps, num_frames=num_frames, duration_s=duration_s, rotation=0,
                     codec="h264", start_time_s=0.0)


def test_the_decode_time_limit_scales_with_the_probed_duration():
    config = DecodeConfig()  # 600 s + 1 s per video second
    assert decode_time_limit(config, _info(10.0)) == 610.0  # a short video keeps today's limit
    assert decode_time_limit(config, _info(4 * 3600.0)) == 600.0 + 4 * 3600.0  # a 4 h video gets over 4 h
    assert decode_time_limit(config, _info(None, num_frames=3000, fps=30.0)) == 700.0  # from the frame count
    assert decode_time_limit(config, _info(None)) == 600.0 + config.max_duration_s  # unknown: the longest allowed
    assert decode_time_limit(config, None) == 600.0 + config.max_duration_s
    assert decode_time_limit(DecodeConfig(timeout_per_video_second=3.0), _info(100.0)) == 900.0
    assert decode_time_limit(DecodeConfig(timeout_s=0), _info(100.0)) is None  # no limit at all
    with pytest.raises(ValueError, match="decode.timeout_per_video_second"):
        DecodeConfig(timeout_per_video_second=-1)


def raise_limit_then_sleep(limit_s: float, sleep_s: float) -> float:
    set_time_limit(limit_s)
    time.sleep(sleep_s)
    return sleep_s


def test_a_call_may_raise_its_own_time_limit_up_to_the_cap():
    with IsolatedWorker() as worker:
        worker.call(raise_limit_then_sleep, 0, 0)  # start the child outside the timed calls
        assert worker.call(raise_limit_then_sleep, 30, 1.5, timeout_s=0.5, max_timeout_s=60) == 1.5
        start = time.monotonic()
        with pytest.raises(ChildTimedOut, match="ran longer than 1 s"):
            worker.call(raise_limit_then_sleep, 3600, 60, timeout_s=0.5, max_timeout_s=1.0)
        assert time.monotonic() - start < 5


def process_slowly(config, video_id: str, uri: str, size: int) -> dict:
    """VideoStage's child entry on a slow machine: the real work, then 4 s more."""
    row = _process_in_child(config, video_id, uri, size)
    time.sleep(4.0)
    return row


class SlowStage(VideoStage):
    child_entry = staticmethod(process_slowly)


def test_a_slow_video_gets_the_time_its_duration_allows(videos, tmp_path):
    path = tmp_path / "slow.mp4"
    path.write_bytes(videos[2])  # 3 s of video
    config = CurateConfig()
    config.decode.timeout_s, config.decode.timeout_per_video_second = 3.0, 3.0  # 3 s + 3 x 3 s = 12 s
    stage = _stage(config, isolate=True, cls=SlowStage)
    stage._worker = IsolatedWorker()
    stage._worker.call(raise_limit_then_sleep, 0, 0)  # the child starts (imports) outside the timed call
    try:
        row = _row(stage, path)
    finally:
        stage.close()
    assert row["status"] == "ok", row["error_message"]


# --- a killed child leaves no copy behind ---------------------------------------------------------------------------


def copy_then(how: str, source: str, report: str) -> None:
    """What local_path does for a remote video (a temporary copy), then the decoder hangs or crashes."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as tmp:
        tmp.write(Path(source).read_bytes())
        tmp.flush()
        Path(report).write_text(tmp.name)
        if how == "hang":
            time.sleep(3600)
        os.kill(os.getpid(), 9)


@pytest.mark.parametrize("how", ["hang", "crash"])
def test_a_killed_childs_temporary_copy_is_removed(how, videos, tmp_path):
    source, report = tmp_path / "v.mp4", tmp_path / "copy-path.txt"
    source.write_bytes(videos[0])
    with IsolatedWorker() as worker:
        worker.call(raise_limit_then_sleep, 0, 0)  # the child starts (imports) outside the timed call
        with pytest.raises(ChildTimedOut if how == "hang" else ChildCrashed):
            worker.call(copy_then, how, str(source), str(report), timeout_s=3.0)
        copy = Path(report.read_text())
        assert copy.name.endswith(".mp4") and not copy.exists()  # the old child left it in /tmp for good
        assert worker.call(tempfile.gettempdir) == worker.scratch_dir  # a fresh child, with a fresh scratch dir


def test_scratch_left_by_a_killed_worker_is_swept_by_the_next_one(tmp_path):
    import subprocess
    import sys

    # A worker process that started a child, then was killed with kill -9: its child's scratch stays behind.
    script = ("import os; from curation.isolate import IsolatedWorker; w = IsolatedWorker(); w.call(os.getcwd); "
              "print(w.scratch_dir, flush=True); os.kill(os.getpid(), 9)")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    left = Path(run.stdout.strip())
    assert run.returncode == -9 and left.is_dir(), run.stderr
    with IsolatedWorker() as worker:
        worker.call(os.getcwd)
        assert not left.exists() and Path(worker.scratch_dir).is_dir()
