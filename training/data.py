"""Training clips from curated shard rows: decode each clip's bytes to a fixed number of frames at a target fps,
resize keeping the aspect ratio and centre-crop: to the stage's square, or to the clip's bucket (training/buckets.py).
training/dataset.py reads the rows, replayably, from a dataset version's shards table."""

from __future__ import annotations

import io
import logging
from typing import Protocol

import av
import numpy as np
import pyarrow as pa
import torch

from models.codec import PixelCodec
from training.clip_table import SHARD_COLUMNS  # noqa: F401 (re-exported: the columns decode_row reads)
from training.config import CurriculumStage

log = logging.getLogger("reelforge.train.data")


def sample_indices(num_frames_in_clip: int, src_fps: float, num_frames: int, fps: float) -> list[int] | None:
    """`num_frames` frame indices at `fps` from the start of the clip, or None when the clip is too short.

    The stride is the nearest whole number of source frames per target frame; a clip too short for that stride
    falls back to the largest stride that fits (faster motion, never padding)."""
    if num_frames_in_clip < num_frames:
        return None
    stride = max(1, round(src_fps / fps)) if fps > 0 else 1
    stride = min(stride, (num_frames_in_clip - 1) // max(1, num_frames - 1)) if num_frames > 1 else stride
    stride = max(1, stride)
    span = stride * (num_frames - 1) + 1
    start = (num_frames_in_clip - span) // 2  # the middle of the clip, away from trimmed edges
    return [start + i * stride for i in range(num_frames)]


def window_indices(num_frames_in_clip: int, src_fps: float, num_frames: int, fps: float,
                   windows: int) -> list[list[int]]:
    """Up to `windows` clips of `num_frames` at `fps` spread evenly over the clip (the middle one alone for 1):
    more training clips from one curated clip, each a different stretch of the same motion. Windows that would
    coincide are given once; a clip too short for one window gives none."""
    middle = sample_indices(num_frames_in_clip, src_fps, num_frames, fps)
    if middle is None:
        return []
    if windows <= 1:
        return [middle]
    stride = middle[1] - middle[0] if len(middle) > 1 else 1
    slack = num_frames_in_clip - (stride * (num_frames - 1) + 1)
    starts = sorted({round(slack * i / (windows - 1)) for i in range(windows)})
    return [[start + i * stride for i in range(num_frames)] for start in starts]


def decode_clip(data: bytes, indices: list[int], size: int | tuple[int, int]) -> np.ndarray:
    """Decode `indices` (sorted) of an encoded clip: (T, H, W, 3) uint8 for `size` (H, W), or (T, size, size, 3)
    for an int. Each frame is resized, keeping its aspect ratio, to the smallest size that covers H x W, then
    centre-cropped: never stretched (for a square that is the short side resized to `size`)."""
    height, width = (size, size) if isinstance(size, int) else size
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                w, h = frame.width, frame.height
                scale = max(width / w, height / h)
                rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
                rgb = frame.reformat(width=rw, height=rh, format="rgb24", interpolation="AREA").to_ndarray()
                top, left = (rh - height) // 2, (rw - width) // 2
                frames[index] = rgb[top:top + height, left:left + width]
                if len(frames) == len(wanted):
                    break
    if len(frames) != len(wanted):
        raise ValueError(f"clip has {len(frames)} of the {len(wanted)} frames its row promised")
    return np.stack([frames[i] for i in indices])


class ClipShape(Protocol):
    """The shape clips are decoded to; training/buckets.py's Bucket is one."""

    num_frames: int
    height: int
    width: int


def decode_row(row: dict, stage: CurriculumStage, windows: int = 1,
               bucket: ClipShape | None = None) -> list[np.ndarray]:
    """The training clips of one shard row at the stage's fps: `windows` windows (see window_indices) from a single
    decode, or none for a clip too short. Without `bucket` they have the stage's frames and square size; with one,
    the bucket's frames, height and width (training/buckets.py)."""
    num_frames, size = (stage.num_frames, stage.size) if bucket is None else (
        bucket.num_frames, (bucket.height, bucket.width))
    spans = window_indices(row["num_frames"], row["fps"], num_frames, stage.fps, windows)
    if not spans:
        return []
    union = sorted({i for span in spans for i in span})
    frames = decode_clip(row["video_bytes"], union, size)
    position = {index: k for k, index in enumerate(union)}
    return [frames[[position[i] for i in span]] for span in spans]


class ClipDecodeStage:
    """Shard rows -> {"video": (B, T, H, W, 3) uint8, "caption": str}; clips too short for the stage are skipped."""

    def __init__(self, stage: CurriculumStage, windows: int = 1):
        self.stage = stage
        self.windows = windows

    def setup(self) -> None:
        pass

    def __call__(self, batch: pa.Table) -> dict:
        videos, captions, ids = [], [], []
        rows = batch.to_pylist()
        for row in rows:
            try:
                clips = decode_row(row, self.stage, self.windows)
            except (av.error.FFmpegError, ValueError) as err:
                log.warning("skipping clip %s: %s", row["clip_id"], err)
                continue
            for w, clip in enumerate(clips):
                videos.append(clip)
                captions.append(row["caption"] or "")
                ids.append(row["clip_id"] if len(clips) == 1 else f"{row['clip_id']}#{w}")
        shape = (0, self.stage.num_frames, self.stage.size, self.stage.size, 3)
        return {"video": np.stack(videos) if videos else np.zeros(shape, np.uint8),
                "caption": np.array(captions, dtype=object), "clip_id": np.array(ids, dtype=object)}


def to_model_input(video_uint8) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]: the pixel codec's encoding."""
    return PixelCodec().encode(video_uint8)


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8: the pixel codec's decoding."""
    return PixelCodec().decode(video)
