"""The one-pass video stage on hand-built batches, without Ray."""

import io

import av
import numpy as np
import pyarrow as pa
import pytest

from curation import schema
from curation.config import CurateConfig
from curation.discover import DiscoverStage, list_videos
from curation.video_stage import VideoStage


@pytest.fixture(scope="module")
def stage():
    s = VideoStage(CurateConfig())
    s.setup()
    return s


def _batch(root, names):
    rows = [{"uri": str(root / n), "size_bytes": (root / n).stat().st_size} for n in names]
    return DiscoverStage(CurateConfig().discover)(pa.Table.from_pylist(rows))


def test_discover_lists_videos_recursively_with_content_ids(sample_dump, tmp_path):
    root, truth = sample_dump
    listed = list_videos(str(root), CurateConfig().discover)
    names = {r["uri"][len(str(root)) + 1:] for r in listed}
    assert names == set(truth["videos"]) | set(truth["bad_files"])  # README.txt and sidecars are not videos
    original = next(n for n in truth["videos"] if "single" in n)
    copy = tmp_path / "renamed copy.mp4"
    copy.write_bytes((root / original).read_bytes())
    ids = _batch(root, [original])["video_id"].to_pylist() + _batch(tmp_path, [copy.name])["video_id"].to_pylist()
    assert ids[0] == ids[1] and len(ids[0]) == 24


def test_stage_turns_a_video_into_clips_with_keyframes_and_playable_bytes(sample_dump, stage):
    root, truth = sample_dump
    name = next(n for n in truth["videos"] if "cuts_static" in n)
    video = truth["videos"][name]
    out = stage(_batch(root, [name]))
    assert out.schema.equals(schema.STAGED)
    row = out.to_pylist()[0]
    assert row["status"] == "ok" and row["num_frames"] == video["num_frames"]
    assert row["cut_frames"] == video["cuts"]
    clips = row["clips"]
    assert len(clips) == len(video["shots"])
    for clip, shot in zip(clips, video["shots"], strict=True):
        # Clips are the shots trimmed at the cuts, never crossing one.
        assert shot["start_frame"] <= clip["start_frame"] <= clip["end_frame"] <= shot["end_frame"]
        assert len(clip["keyframes"]) == 3 and all(k[:2] == b"\xff\xd8" for k in clip["keyframes"])
        if shot["kind"] == "static":
            assert not clip["kept"] and clip["drop_reason"].startswith("motion(") and clip["video_bytes"] is None
        else:
            assert clip["kept"] and clip["drop_reason"] is None
            with av.open(io.BytesIO(clip["video_bytes"])) as container:
                frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
            assert clip["num_frames"] == clip["end_frame"] - clip["start_frame"] + 1
            # Every step-th frame of the video (encode.fps 8 at 24 fps: every 3rd) inside the clip is encoded.
            grid = [i for i in range(clip["start_frame"], clip["end_frame"] + 1) if i % 3 == 0]
            assert len(frames) == clip["encode_frames"] == len(grid)
            assert clip["encode_fps"] == pytest.approx(row["fps"] / 3)
            assert min(frames[0].shape[:2]) <= CurateConfig().encode.short_side


def test_long_shots_are_split_into_windows(sample_dump):
    root, truth = sample_dump
    name = next(n for n in truth["videos"] if "single" in n)
    config = CurateConfig()
    config.shots.max_seconds = 1.0
    config.filters.duration.min = 0.5
    stage = VideoStage(config)
    row = stage(_batch(root, [name])).to_pylist()[0]
    durations = [c["end_s"] - c["start_s"] for c in row["clips"]]
    assert len(durations) >= 3 and max(durations) <= 1.0 + 1e-6
    assert all(a["end_frame"] + 1 == b["start_frame"] for a, b in zip(row["clips"], row["clips"][1:], strict=False))


def test_every_bad_file_is_quarantined_with_a_reason(sample_dump, stage):
    root, truth = sample_dump
    out = stage(_batch(root, sorted(truth["bad_files"]))).to_pylist()
    for row in out:
        name = row["uri"].rsplit("/", 1)[-1]
        assert row["status"] == "quarantined" and row["clips"] == []
        assert row["error_class"] in truth["bad_files"][name], (name, row["error_class"])
        assert row["error_message"]


def test_shared_bad_files_quarantined_and_audio_failure_tolerated(shared_videos, ground_truth, stage):
    names = ["decord/corrupted.mp4", "moviepy/bitmap.mp4", "moviepy/video_with_failing_audio.mp4"]
    rows = {r["uri"].split("videos/")[-1]: r for r in stage(_batch(shared_videos, names)).to_pylist()}
    assert rows["decord/corrupted.mp4"]["error_class"] == "decode_error"
    assert "decord" in rows["decord/corrupted.mp4"]["error_message"]
    assert "pyav" in rows["decord/corrupted.mp4"]["error_message"]
    assert rows["moviepy/bitmap.mp4"]["error_class"] == "resolution_too_small"
    ok = rows["moviepy/video_with_failing_audio.mp4"]
    assert ok["status"] == "ok" and ok["num_frames"] == ground_truth["moviepy/video_with_failing_audio.mp4"]["frames"]
    assert np.isfinite(ok["clips"][0]["motion_median"])


def test_clips_are_encoded_at_encode_fps_and_training_reads_the_same_frames(sample_dump):
    """encode.fps thins the stored clip to every step-th frame; a training stage at that fps samples frames the same
    distance apart (in source frames) from the thinned clip as from one holding every frame (encode.fps=0)."""
    from training.data import sample_indices

    root, truth = sample_dump
    name = next(n for n in truth["videos"] if "cuts_pan" in n)
    rows = {}
    for fps in (0.0, 8.0):
        config = CurateConfig()
        config.encode.fps = fps
        stage = VideoStage(config)
        stage.setup()
        rows[fps] = stage(_batch(root, [name])).to_pylist()[0]
    every, thinned = rows[0.0]["clips"], rows[8.0]["clips"]
    assert [c["start_frame"] for c in every] == [c["start_frame"] for c in thinned]  # the same clips and verdicts
    assert [c["drop_reason"] for c in every] == [c["drop_reason"] for c in thinned]
    kept = [(a, b) for a, b in zip(every, thinned, strict=True) if a["video_bytes"]]
    assert kept
    for a, b in kept:
        assert a["encode_frames"] == a["num_frames"] and a["encode_fps"] == pytest.approx(rows[0.0]["fps"])
        assert len(b["video_bytes"]) < len(a["video_bytes"])
        first = -(-b["start_frame"] // 3) * 3  # the clip's first frame on the grid of every 3rd frame
        native = [a["start_frame"] + i for i in sample_indices(a["num_frames"], a["encode_fps"], 4, 8.0)]
        thin = [first + 3 * i for i in sample_indices(b["encode_frames"], b["encode_fps"], 4, 8.0)]
        assert np.diff(native).tolist() == np.diff(thin).tolist() == [3, 3, 3]
        assert abs(native[0] - thin[0]) <= 3  # both windows sit in the middle of the clip
