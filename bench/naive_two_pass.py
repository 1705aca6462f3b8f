"""The baselines reelforge's curation pass is measured against: the PyAV decode floor and the naive two-pass
(PySceneDetect's default detector, then a separate PyAV decode feeding Farneback at 2 fps). Each function decodes
one file and returns the number of frames it decoded (0 where the library does not say).

Set OPENCV_FFMPEG_THREADS=1 (and the BLAS thread counts) before importing this module for single-threaded figures:
OpenCV's FFmpeg reader, which PySceneDetect uses, otherwise starts one decoder thread per CPU.
"""

import av
import cv2
import numpy as np
import scenedetect
from scenedetect import ContentDetector

NAIVE_FLOW_WIDTH = 256
NAIVE_FLOW_FPS = 2.0


def floor_pyav(path: str, *_) -> int:
    """Every frame decoded on one thread and thrown away, with no pixel conversion."""
    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        count = 0
        for _ in container.decode(stream):
            count += 1
    return count


def naive_scenedetect(path: str, *_) -> int:
    """PySceneDetect's default: ContentDetector, its default backend (OpenCV), auto-downscaled to ~256 px."""
    scenedetect.detect(path, ContentDetector())
    return 0  # detect() does not say how many frames it read


def naive_flow(path: str, *_) -> int:
    """What a second, motion-only pass typically looks like: decode again, sample 2 fps by time, Farneback."""
    with av.open(path, metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        prev = None
        first_pts = None
        next_time = 0.0
        count = 0
        magnitudes = []
        for frame in container.decode(stream):
            count += 1
            if frame.pts is None:
                continue
            if first_pts is None:
                first_pts = frame.pts
            time_s = float((frame.pts - first_pts) * frame.time_base)
            if time_s + 1e-6 < next_time:
                continue
            next_time = time_s + 1.0 / NAIVE_FLOW_FPS
            width = min(NAIVE_FLOW_WIDTH, frame.width)
            height = max(1, round(frame.height * width / frame.width))
            grey = frame.to_ndarray(format="gray", width=width, height=height, interpolation="AREA")
            if prev is not None:
                flow = cv2.calcOpticalFlowFarneback(prev, grey, None, 0.5, 3, 15, 3, 5, 1.2, 0)
                magnitudes.append(float(np.linalg.norm(flow, axis=-1).mean()))
            prev = grey
    return count


def naive_two_pass(path: str, *_) -> int:
    """Both passes of the naive baseline on one file."""
    naive_scenedetect(path)
    return naive_flow(path)
