"""The stages of `reelforge encode` (pipelines/encode.py turns them into a Ray Data plan): curated clips -> decoded
windows per curriculum stage (CPU) -> the codec's latent distribution -> the caption's text-encoder tokens,
embedding and mask. Each stage is a small class: settings in __init__, heavy state in setup(), __call__(batch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import av
import numpy as np
import pyarrow as pa
import torch

from curation.dataset import open_data, sql_list
from models.codec import CodecConfig, build_codec
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from training.buckets import Bucket, StageBuckets
from training.config import BucketConfig, CurriculumStage, RayConfig
from training.data import SHARD_COLUMNS, decode_row, window_indices

log = logging.getLogger("reelforge.encode")

DTYPES = ("float16", "float32")


@dataclass
class PoolConfig:
    """One stage's workers: Ray actors (or tasks) with these resources, `concurrency` of them."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    concurrency: int = 1
    batch_size: int = 4  # rows per call (decode: clips per call)


@dataclass
class EncodeConfig:
    data: str = ""  # a curated dataset, DIR or DIR@vN (default: its newest version)
    output: str = ""  # the latent cache: OUTPUT/latents.lance
    codec: CodecConfig = field(default_factory=CodecConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    # The shapes training reads: each stage's frames, fps and size, by name (a train config's curriculum).
    curriculum: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])
    windows_per_clip: int = 1  # as the train config's data_loading.windows_per_clip
    # As the train config's buckets (training/buckets.py): each stage's windows at the clip's bucket; none: squares
    buckets: BucketConfig = field(default_factory=BucketConfig)
    patch_size: int = 2  # with buckets: the model's patch_size (bucket sides are multiples of it x the compression)
    dtype: str = "float16"  # how latents and text embeddings are stored
    commit_clips: int = 16  # clips per commit: kill -9 loses at most this many clips' work
    # The three pools live at once: their CPUs add up to 2, so a 2-core machine runs them; a VAE wants num_gpus
    decode: PoolConfig = field(default_factory=PoolConfig)
    encoder: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=8))  # the codec's actors
    text_encoder: PoolConfig = field(default_factory=lambda: PoolConfig(num_cpus=0.5, batch_size=16))
    ray: RayConfig = field(default_factory=RayConfig)


def expected_windows(num_frames: int | None, fps: float | None, stage: CurriculumStage, windows: int,
                     bucket: Bucket | None = None) -> int:
    """How many training windows a clip gives at a stage (the reader's window_indices), at its bucket's frame count
    when the stage has buckets: 0 for a clip too short."""
    if num_frames is None or fps is None:
        return 0
    frames = stage.num_frames if bucket is None else bucket.num_frames
    return len(window_indices(num_frames, fps, frames, stage.fps, windows))


def clip_bucket(buckets: StageBuckets | None, row: dict) -> tuple[Bucket | None, str | None]:
    """(the clip's bucket at a bucketed stage, None) or (None, why it fits none); (None, None) without buckets."""
    if buckets is None:
        return None, None
    index, reason = buckets.fit(row.get("width"), row.get("height"), row.get("num_frames"), row.get("fps"))
    return (None, reason) if index is None else (buckets.buckets[index], None)


def _as_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array).tobytes()


class ClipWindowsStage:
    """{"clip_id", "stages"} -> one row per (clip, stage, window): the decoded window's uint8 bytes and shape, the
    caption and the curated version the clip came from. A clip that does not decode gives no rows (counted by the
    driver as undecodable); a clip's rows come out together or not at all. A stage in `buckets` decodes each clip
    at its bucket's frames and shape (training/buckets.py)."""

    def __init__(self, data: str, stages: list[CurriculumStage], windows: int,
                 buckets: dict[str, StageBuckets | None] | None = None):
        self.data, self.stages, self.windows = data, {s.name: s for s in stages}, windows
        self.buckets = buckets or {}

    def setup(self) -> None:
        dataset, number = open_data(self.data)
        self.shards = dataset.open("shards", number)

    def __call__(self, batch: pa.Table) -> pa.Table:
        wanted = dict(zip(batch["clip_id"].to_pylist(), batch["stages"].to_pylist(), strict=True))
        shards = self.shards.to_table(columns=[*SHARD_COLUMNS, "dataset_version", "width", "height"],
                                      filter=f"clip_id IN ({sql_list(wanted)})").to_pylist()
        out = []
        for row in sorted(shards, key=lambda r: r["clip_id"]):
            out.extend(self._windows(row, wanted[row["clip_id"]]))
        return pa.Table.from_pylist(out, schema=WINDOWS)

    def _windows(self, row: dict, stages: list[str]) -> list[dict]:
        rows = []
        try:
            for name in stages:
                bucket, unfit = clip_bucket(self.buckets.get(name), row)
                if unfit:  # the driver planned no rows for it
                    continue
                for window, clip in enumerate(decode_row(row, self.stages[name], self.windows, bucket)):
                    rows.append({"clip_id": row["clip_id"], "stage": name, "window": window,
                                 "caption": row["caption"] or "", "dataset_version": row["dataset_version"],
                                 "video": _as_bytes(clip), "video_shape": list(clip.shape)})
        except (av.error.FFmpegError, ValueError, IndexError) as err:
            log.warning("clip %s cannot be decoded; it is not encoded: %s", row["clip_id"], err)
            return []
        return rows


WINDOWS = pa.schema([("clip_id", pa.string()), ("stage", pa.string()), ("window", pa.int32()),
                     ("caption", pa.string()), ("dataset_version", pa.int32()), ("video", pa.large_binary()),
                     ("video_shape", pa.list_(pa.int32()))])


class CodecStage:
    """Decoded windows -> the codec's latent distribution: `latent` (the mean), `logvar`, `latent_shape`, `dtype`.
    The pixel bytes leave the batch."""

    def __init__(self, config: CodecConfig, dtype: str):
        self.config, self.dtype = config, dtype

    def setup(self) -> None:
        self.codec = build_codec(self.config)  # it runs where codec.device says ("cuda" or "auto" with num_gpus)

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        means, logvars = [], []
        for video, shape in zip(batch["video"].to_pylist(), batch["video_shape"].to_pylist(), strict=True):
            # One window at a time: a batched conv's result can depend on the batch's size, and a row must not
            # depend on how Ray grouped it (a rerun after kill -9 writes the same bytes)
            video = np.frombuffer(video, np.uint8).reshape(1, *shape)  # (1, T, H, W, 3)
            mean, logvar = self.codec.encode_distribution(torch.from_numpy(video.copy()))  # (1, C, T', H', W')
            means.append(mean[0].float().cpu().numpy().astype(self.dtype))
            point = bool(torch.isneginf(logvar).all())  # a point mass (pixels): no variance to store
            logvars.append(None if point else logvar[0].float().cpu().numpy().astype(self.dtype))
        batch = batch.drop_columns(["video", "video_shape"])
        batch = batch.append_column("latent", pa.array([_as_bytes(m) for m in means], pa.large_binary()))
        batch = batch.append_column("logvar", pa.array([None if v is None else _as_bytes(v) for v in logvars],
                                                       pa.large_binary()))
        batch = batch.append_column("latent_shape", pa.array([list(m.shape) for m in means], pa.list_(pa.int32())))
        return batch.append_column("dtype", pa.array([np.dtype(self.dtype).str] * len(means), pa.string()))


class TextStage:
    """Rows with a caption -> its tokens, the text encoder's embedding (L, width) and the mask (L,)."""

    def __init__(self, config: TextEncoderConfig, dtype: str, use_gpu: bool):
        self.config, self.dtype, self.use_gpu = config, dtype, use_gpu

    def setup(self) -> None:
        self.device = torch.device("cuda" if self.use_gpu and torch.cuda.is_available() else "cpu")
        self.encoder = FrozenTextEncoder(self.config).to(self.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        text, mask, tokens = encode_text(self.encoder, batch["caption"].to_pylist(), self.dtype)
        batch = batch.append_column("text", pa.array([_as_bytes(t) for t in text], pa.large_binary()))
        batch = batch.append_column("text_shape", pa.array([list(t.shape) for t in text], pa.list_(pa.int32())))
        batch = batch.append_column("text_mask", pa.array([_as_bytes(m) for m in mask], pa.large_binary()))
        return batch.append_column("text_tokens", pa.array([_as_bytes(t) for t in tokens], pa.large_binary()))


def encode_text(encoder: FrozenTextEncoder, captions: list[str], dtype: str) -> tuple[np.ndarray, ...]:
    """(embedding (B, L, width) in `dtype`, mask (B, L) bool, tokens (B, L) int32) of the captions."""
    tokens, _ = encoder.tokenize(captions)
    # one caption at a time, each distinct one once: a batched matmul's result can depend on the batch's size
    encoded = {c: encoder([c]) for c in dict.fromkeys(captions)}
    context = np.stack([encoded[c][0][0].float().cpu().numpy() for c in captions]).astype(dtype)
    mask = np.stack([encoded[c][1][0].cpu().numpy() for c in captions]).astype(bool)
    return context, mask, tokens.cpu().numpy().astype(np.int32)
