"""Small real videos for the hostile-input tests (written with PyAV), and a secret that must never reach an output."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

SECRET = "SECRET=hunter2"  # the secret_file fixture writes it; no output may ever hold it


def encode_video(seed: int, seconds: float = 3.0, fps: int = 10, width: int = 96, height: int = 64) -> bytes:
    """An H.264 MP4 of a square moving over a plain background; the seed picks the colours (so the content id)."""
    import av

    rng = np.random.default_rng(seed)
    background, square = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[:] = background
            x = (i * 3) % (width - 16)
            rgb[20:36, x : x + 16] = square
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


@pytest.fixture(scope="session")
def videos() -> list[bytes]:
    return [encode_video(seed) for seed in range(3)]


@pytest.fixture
def secret_file(tmp_path_factory) -> Path:
    """A file outside every input root that holds a secret, as /proc/self/environ would."""
    path = tmp_path_factory.mktemp("outside") / "environ"
    path.write_text(SECRET + "\n")
    return path
