"""Motion scores from dense optical flow (OpenCV Farneback) on downscaled grey frames of the single decode."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from curation.config import MotionConfig


@dataclass
class FlowSample:
    first_frame: int
    last_frame: int
    magnitude: float  # reelforge mode: px/s at motion.reference_width; video2dataset mode: px per sampled pair


@dataclass
class MotionStats:
    mean: float
    median: float
    p90: float
    is_static: bool
    num_pairs: int


class MotionScorer:
    """Push every decoded frame; the scorer picks its own samples and keeps one small grey frame at a time."""

    def __init__(self, config: MotionConfig, fps: float):
        if config.mode not in ("reelforge", "video2dataset"):
            raise ValueError(f"motion.mode must be 'reelforge' or 'video2dataset', got {config.mode!r}")
        self.config = config
        self.fps = fps
        self.samples: list[FlowSample] = []
        self._total, self._count = 0.0, 0  # over the whole video, unaffected by forget_before
        self._prev: tuple[int, float, np.ndarray] | None = None
        self._next_time = 0.0
        # video2dataset's test keeps every int(native_fps / fps)-th of the first `upstream_frames` frames.
        self._step = max(1, int(fps / config.fps)) if config.fps > 0 else 1

    def _flow(self, a: np.ndarray, b: np.ndarray) -> float:
        c = self.config
        flow = cv2.calcOpticalFlowFarneback(a, b, None, c.pyr_scale, c.levels, c.winsize, c.iterations, c.poly_n,
                                            c.poly_sigma, 0)
        return float(np.linalg.norm(flow, axis=-1).mean())

    def _grey(self, rgb: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if self.config.mode == "video2dataset":
            return grey  # upstream flows at full resolution
        h, w = grey.shape
        if w > self.config.analysis_width:
            size = (self.config.analysis_width, max(1, round(h * self.config.analysis_width / w)))
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        return grey

    def wants(self, index: int, time_s: float) -> bool:
        """Whether this frame is a flow sample; lets the caller skip work for other frames."""
        if self.config.mode == "video2dataset":
            return index < self.config.upstream_frames and index % self._step == 0
        return time_s + 1e-6 >= self._next_time

    def push(self, index: int, time_s: float, rgb: np.ndarray) -> None:
        if not self.wants(index, time_s):
            return
        grey = self._grey(rgb)
        if self.config.mode == "reelforge":
            self._next_time = time_s + 1.0 / self.config.fps
        if self._prev is not None:
            prev_index, prev_time, prev_grey = self._prev
            magnitude = self._flow(prev_grey, grey)
            if self.config.mode == "reelforge":
                magnitude *= self.config.reference_width / grey.shape[1] / max(time_s - prev_time, 1e-3)
            self.samples.append(FlowSample(prev_index, index, magnitude))
            self._total += magnitude
            self._count += 1
        self._prev = (index, time_s, grey)

    def mean_magnitude(self) -> float:
        """The video-level score: mean over sampled pairs of the per-pair mean flow magnitude."""
        return self._total / self._count if self._count else float("nan")

    def stats(self, start_frame: int, end_frame: int) -> MotionStats:
        """Statistics over the flow samples that lie inside frames [start_frame, end_frame]."""
        values = np.array([s.magnitude for s in self.samples
                           if s.first_frame >= start_frame and s.last_frame <= end_frame], dtype=np.float64)
        if values.size == 0:
            return MotionStats(float("nan"), float("nan"), float("nan"), False, 0)
        median = float(np.median(values))
        return MotionStats(float(values.mean()), median, float(np.percentile(values, 90)),
                           median < self.config.static_threshold, int(values.size))

    def forget_before(self, frame: int) -> None:
        """Drop samples no clip can use any more, so memory stays flat on long videos."""
        if self.samples and self.samples[0].last_frame < frame:
            self.samples = [s for s in self.samples if s.last_frame >= frame]
