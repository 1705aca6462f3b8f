"""Clip encoding and keyframes: kept clips become compact H.264 byte strings the training loader can decode."""

from __future__ import annotations

import io
from fractions import Fraction

import cv2
import numpy as np

from curation.config import EncodeConfig


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def encode_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    if min(width, height) > short_side > 0:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


def frame_step(fps: float, target_fps: float) -> int:
    """Every how many source frames a clip is encoded: the nearest whole number of frames per frame at `target_fps`,
    the stride training takes at that rate (training/data.py sample_indices), so training at `target_fps` reads the
    same source frames from the thinned clip as from every frame. 1 (every frame) for target_fps 0 or above fps."""
    if target_fps <= 0 or fps <= 0:
        return 1
    return max(1, round(fps / target_fps))


class ClipEncoder:
    """Streams frames into an in-memory MP4; timestamps are kept, so variable frame rate survives."""

    TIME_BASE = Fraction(1, 1000)

    def __init__(self, config: EncodeConfig, width: int, height: int, fps: float):
        import av

        self.config = config
        self.width, self.height = encode_size(width, height, config.short_side)
        self._buffer = io.BytesIO()
        self._container = av.open(self._buffer, mode="w", format=config.container)
        rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
        self._stream = self._container.add_stream(config.codec, rate=rate)
        self._stream.width, self._stream.height = self.width, self.height
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = self.TIME_BASE
        # Deterministic output, so a resumed run's shards equal an uninterrupted run's: one thread (Ray parallelism
        # is across videos) and no macroblock-tree rate control, whose output varied between processes.
        self._stream.codec_context.thread_count = 1
        self._stream.options = {"crf": str(config.crf), "preset": config.preset, "threads": "1",
                                "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:mbtree=0"}
        self._first_time: float | None = None
        self._last_pts = -1
        self.num_frames = 0

    def add(self, time_s: float, rgb: np.ndarray) -> None:
        import av

        if (rgb.shape[1], rgb.shape[0]) != (self.width, self.height):
            rgb = cv2.resize(rgb, (self.width, self.height), interpolation=cv2.INTER_AREA)
        if self._first_time is None:
            self._first_time = time_s
        pts = max(self._last_pts + 1, round((time_s - self._first_time) / float(self.TIME_BASE)))
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
        frame.pts, frame.time_base = pts, self.TIME_BASE
        self._last_pts = pts
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.num_frames += 1

    def close(self) -> bytes:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        return self._buffer.getvalue()

    def abort(self) -> None:
        try:
            self._container.close()
        except Exception:  # noqa: BLE001 - the bytes are thrown away anyway
            pass
