"""The training loader's frame sampling and decoding, on a clip encoded here with known content per frame."""

from __future__ import annotations

import io

import av
import numpy as np
import pyarrow as pa

from training.config import CurriculumStage
from training.data import ClipDecodeStage, sample_indices, window_indices


def _clip(num_frames: int, fps: int = 24) -> bytes:
    """Frame i is a flat grey of level 8 * i: the decoded level says which source frame came out."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 8 * i, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def test_middle_window_at_the_target_rate():
    assert sample_indices(96, 24.0, 4, 4.0) == [38, 44, 50, 56]  # stride 6 = 24/4, centred
    assert sample_indices(3, 24.0, 4, 4.0) is None
    assert sample_indices(10, 24.0, 4, 4.0) == [0, 3, 6, 9]  # too short for stride 6: the largest that fits


def test_windows_spread_over_the_clip_and_never_leave_it():
    windows = window_indices(96, 24.0, 4, 4.0, 4)
    assert windows[0][0] == 0 and windows[-1][-1] == 95
    assert all(np.diff(w).tolist() == [6, 6, 6] for w in windows)
    assert len({w[0] for w in windows}) == 4
    assert window_indices(96, 24.0, 4, 4.0, 1) == [sample_indices(96, 24.0, 4, 4.0)]
    assert window_indices(19, 24.0, 4, 4.0, 5) == [[0, 6, 12, 18]]  # a single fitting window is given once
    assert window_indices(3, 24.0, 4, 4.0, 3) == []


def test_each_window_is_decoded_from_its_own_frames():
    data = _clip(30)
    rows = pa.table({"video_bytes": [data], "num_frames": [30], "fps": [24.0], "caption": ["grey"],
                     "clip_id": ["c0"]})
    stage = CurriculumStage(num_frames=3, fps=8.0, size=16)
    out = ClipDecodeStage(stage, windows=2)(rows)
    assert out["video"].shape == (2, 3, 16, 16, 3)
    assert list(out["clip_id"]) == ["c0#0", "c0#1"] and list(out["caption"]) == ["grey", "grey"]
    levels = out["video"].mean(axis=(2, 3, 4)) / 8  # the source frame index of each decoded frame
    expected = np.array(window_indices(30, 24.0, 3, 8.0, 2), dtype=float)
    np.testing.assert_allclose(levels, expected, atol=0.3)
