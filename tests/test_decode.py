"""Decoding real files (rotation, timestamps, VFR, bad inputs) and generated files with known answers."""

import itertools
import os

import numpy as np
import pytest

from curation.config import DecodeConfig
from curation.decode import VideoRejected, analysis_size, decode_frames, probe, work_size


def _decode_all(path, backend, short_side=256):
    config = DecodeConfig(work_short_side=short_side)
    info = probe(str(path), config)
    info.work_width, info.work_height = work_size(info.width, info.height, short_side)
    return info, list(decode_frames(str(path), info, backend, config))


def test_work_size_bounds_the_short_side_and_never_upscales():
    assert work_size(1920, 1080, 256) == (454, 256)
    assert work_size(1080, 1920, 256) == (256, 454)
    assert work_size(320, 240, 256) == (320, 240)
    assert work_size(1920, 1080, 0) == (1920, 1080)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_generated_video_frame_count_and_timestamps(sample_dump, backend):
    root, truth = sample_dump
    name, video = next((k, v) for k, v in truth["videos"].items() if "single" in k)
    info, frames = _decode_all(root / name, backend)
    assert len(frames) == video["num_frames"]
    times = np.array([f.time_s for f in frames])
    assert np.allclose(np.diff(times), 1 / truth["fps"], atol=2e-3)
    assert frames[0].rgb.shape == (info.work_height, info.work_width, 3)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name", ["video_0.mov", "video_90.mov", "video_180.mov", "video_270.mov"])
def test_rotation_metadata_is_honoured(shared_videos, ground_truth, backend, name):
    expected_h, expected_w, _ = ground_truth[f"decord/{name}"]["decoded_hwc"]
    info, frames = _decode_all(shared_videos / "decord" / name, backend, short_side=0)
    assert (info.height, info.width) == (expected_h, expected_w)
    assert frames[0].rgb.shape[:2] == (expected_h, expected_w)


def test_both_backends_agree_on_rotated_pixels(shared_videos):
    _, a = _decode_all(shared_videos / "moviepy" / "fire2.mp4", "decord")
    _, b = _decode_all(shared_videos / "moviepy" / "fire2.mp4", "pyav")
    assert a[0].rgb.shape == b[0].rgb.shape
    # Same picture, same orientation: a wrong rotation would differ by far more than scaler differences.
    assert np.abs(a[0].rgb.astype(int) - b[0].rgb).mean() < 12


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_variable_frame_rate_timestamps_come_from_the_stream(shared_videos, ground_truth, backend):
    truth = ground_truth["pyscenedetect/goldeneye-vfr-drop3.mp4"]
    info, frames = _decode_all(shared_videos / "pyscenedetect" / "goldeneye-vfr-drop3.mp4", backend)
    assert len(frames) == truth["frames"]
    for cut, seconds in zip(truth["hard_cuts"], truth["hard_cuts_seconds"], strict=True):
        assert frames[cut].time_s == pytest.approx(seconds, abs=0.05)
    assert info.fps == pytest.approx(truth["fps_avg"], rel=0.02)


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_delayed_start_and_unordered_frames(shared_videos, ground_truth, backend):
    info, frames = _decode_all(shared_videos / "pyscenedetect" / "delayed_start.mp4", backend)
    assert info.start_time_s == pytest.approx(1.075, abs=1e-3)
    assert frames[0].time_s == 0.0 and len(frames) == ground_truth["pyscenedetect/delayed_start.mp4"]["frames"]
    _, frames = _decode_all(shared_videos / "decord" / "unordered.mov", backend)
    expected = ground_truth["decord/unordered.mov"]["timestamps_s"]
    assert [f.time_s for f in frames] == pytest.approx(expected, abs=2e-3)


def test_degenerate_and_broken_metadata_files(shared_videos):
    with pytest.raises(VideoRejected) as err:
        probe(str(shared_videos / "moviepy" / "bitmap.mp4"), DecodeConfig())
    assert err.value.reason == "resolution_too_small"
    # No container duration: decord refuses it, PyAV decodes every frame.
    _, frames = _decode_all(shared_videos / "moviepy" / "no_duration.webm", "pyav")
    assert len(frames) == 74


def test_limits_reject_hostile_files(sample_dump):
    root, truth = sample_dump
    name = next(k for k in truth["videos"] if "single" in k)
    with pytest.raises(VideoRejected) as err:
        probe(str(root / name), DecodeConfig(max_duration_s=1.0))
    assert err.value.reason == "too_long"
    config = DecodeConfig(max_frames=10)
    info = probe(str(root / name), DecodeConfig())
    info.work_width, info.work_height = work_size(info.width, info.height, 256)
    with pytest.raises(VideoRejected, match="max_frames"):
        list(decode_frames(str(root / name), info, "pyav", config))


@pytest.mark.parametrize("backend", ["decord", "pyav"])
@pytest.mark.parametrize("name", ["video_0.mov", "video_90.mov", "video_270.mov"])
def test_the_analysis_picture_is_the_working_picture_made_small(shared_videos, backend, name):
    """Frame.analysis comes from the same decode at the analysis size, in the same orientation and colours."""
    import cv2

    config = DecodeConfig()
    info = probe(str(shared_videos / "decord" / name), config)
    info.work_width, info.work_height = work_size(info.width, info.height, 256)
    info.analysis_width, info.analysis_height = analysis_size(info.work_width, info.work_height, 128)
    frames = list(decode_frames(str(shared_videos / "decord" / name), info, backend, config))
    for frame in frames[:: max(1, len(frames) // 4)]:
        assert frame.analysis.shape == (info.analysis_height, info.analysis_width, 3)
        assert frame.rgb.shape == (info.work_height, info.work_width, 3)
        # Compared at 32 px wide, where the fast scaler's aliasing mostly averages out: on these files it stays under
        # 6 levels, while the picture turned 180 degrees is 32-61 levels off and with red and blue swapped 13-19.
        coarse = (32, 32 * info.analysis_height // info.analysis_width)
        ours = cv2.resize(frame.analysis, coarse, interpolation=cv2.INTER_AREA).astype(int)
        reference = cv2.resize(frame.rgb, coarse, interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(ours - reference).mean() < 8


def test_a_released_frame_keeps_its_analysis_picture_only(sample_dump):
    """A frame no clip encodes is released at decode: it never pays for its working-size picture."""
    root, truth = sample_dump
    path = str(root / next(n for n in truth["videos"] if "single" in n))
    config = DecodeConfig()
    info = probe(path, config)
    info.work_width, info.work_height = work_size(info.width, info.height, 256)
    info.analysis_width, info.analysis_height = analysis_size(info.work_width, info.work_height, 64)
    kept, released = itertools.islice(decode_frames(path, info, "pyav", config), 2)
    released.release()
    assert kept.has_rgb and not released.has_rgb
    assert released.analysis.shape == (info.analysis_height, info.analysis_width, 3)
    with pytest.raises(ValueError, match="was released"):
        released.rgb  # noqa: B018


def test_analysis_size_keeps_the_aspect_with_even_sides():
    assert analysis_size(454, 256, 128) == (128, 72)
    assert analysis_size(256, 454, 128) == (128, 228)
    assert analysis_size(100, 60, 128) == (100, 60)  # never upscaled


class _Store:
    """A remote store with one video on it (fsspec's in-memory file system behind pyarrow), whose reads can fail."""

    def __init__(self, data: bytes, error: OSError | None):
        import fsspec
        import pyarrow.fs as pafs

        memory = fsspec.filesystem("memory")
        memory.pipe("/dump/v.mp4", data)
        store = self

        class Handler(pafs.FSSpecHandler):
            def open_input_stream(self, path):
                if store.error is not None:
                    raise store.error
                return super().open_input_stream(path)

        self.error = error
        self.fs = pafs.PyFileSystem(Handler(memory))

    def from_uri(self, uri: str):
        return self.fs, "/dump/v.mp4"


def test_a_remote_read_error_quarantines_the_file_but_throttling_fails_the_run(monkeypatch):
    import pyarrow.fs as pafs

    from curation.decode import local_path

    store = _Store(b"\0" * 1000, None)
    monkeypatch.setattr(pafs, "FileSystem", store)  # local_path resolves s3://... through pafs.FileSystem.from_uri
    with local_path("s3://dump/v.mp4", 1 << 20) as path:
        assert open(path, "rb").read() == b"\0" * 1000  # a temporary copy, removed on exit
    assert not os.path.exists(path)
    store.error = OSError("AWS Error ACCESS_DENIED during GetObject operation: Access Denied")
    with pytest.raises(VideoRejected) as err, local_path("s3://dump/v.mp4", 1 << 20):
        pass
    assert err.value.reason == "unreadable" and "ACCESS_DENIED" in str(err.value)
    store.error = OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate.")
    with pytest.raises(OSError, match="SLOW_DOWN"), local_path("s3://dump/v.mp4", 1 << 20):
        pass
