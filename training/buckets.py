"""Aspect-ratio and frame-count buckets: the (frames, height, width) of each bucket at a curriculum stage, which
bucket each clip trains in, and a replayable batch sampler whose every micro-batch comes from one bucket. With no
buckets configured (`buckets.aspect_ratios` empty, the default) training keeps square centre crops
(training/dataset.py's StageSampler) and none of this runs.

The size rule: at a stage of `size`, a bucket of aspect ratio r = width / height holds about size x size pixels,
    height = m * round(size / sqrt(r) / m),  width = m * round(size * sqrt(r) / m)  (each at least m),
where m = the model's patch_size x the codec's space compression, so the latent splits into whole patches and every
bucket of a stage costs about the same tokens per frame (1:1 is exactly the stage's square). Ratios that round to
the same shape at a stage are one bucket. Frame counts come from the stage's `bucket_frames` (none: `num_frames`).

A clip goes to the bucket whose shape's aspect ratio is nearest its own in log ratio, and to the largest frame count
it fills at the stage's fps. It is resized to cover the bucket keeping its aspect ratio and centre-cropped, so the crop
removes at most 1 - exp(-max_aspect_error) of one side and nothing is stretched. A clip further than max_aspect_error
from every bucket, or shorter than the smallest frame count, fits none: it is counted by reason and reported, not
trained on.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from training.config import BucketConfig, CurriculumStage, parse_ratio
from training.data import window_indices

log = logging.getLogger("reelforge.train.buckets")

UNFIT_REASONS = ("aspect", "frames", "unknown")  # unknown: the row has no size, frame count or fps


@dataclass(frozen=True)
class Bucket:
    """One shape clips are decoded to: `num_frames` x `height` x `width` pixels; `ratio` names it (e.g. "16:9")."""

    ratio: str
    num_frames: int
    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.ratio.replace(':', 'x')}_{self.num_frames}f_{self.height}x{self.width}"

    @property
    def log_aspect(self) -> float:
        return math.log(self.width / self.height)


@dataclass(frozen=True)
class StageBuckets:
    """The buckets of one curriculum stage and how far a clip's aspect ratio may be from its bucket's."""

    stage: CurriculumStage
    buckets: tuple[Bucket, ...]
    max_aspect_error: float

    def fit(self, width: int | None, height: int | None, num_frames: int | None,
            fps: float | None) -> tuple[int | None, str | None]:
        """(index of the clip's bucket, None), or (None, the reason it fits none: one of UNFIT_REASONS)."""
        index, reason = self.fit_all([width], [height], [num_frames], [fps])
        return (None, UNFIT_REASONS[int(reason[0])]) if index[0] < 0 else (int(index[0]), None)

    def fit_all(self, width: list, height: list, num_frames: list, fps: list) -> tuple[np.ndarray, np.ndarray]:
        """fit() of every row at once (metadata columns; None where unknown): (the bucket index per row, -1 for
        none; the reason per row, -1 where it fits, else an index into UNFIT_REASONS). Buckets are ratio-major with
        frame counts ascending (stage_buckets' order); an exact tie goes to the first ratio."""
        w, h, n, f = (np.array(c, dtype=np.float64).reshape(-1) for c in (width, height, num_frames, fps))
        known = (w > 0) & (h > 0) & (n > 0) & (f > 0)  # NaN (None) compares False
        ratios = list(dict.fromkeys(b.ratio for b in self.buckets))
        frames = np.array(sorted({b.num_frames for b in self.buckets}))
        logs = np.array([next(b.log_aspect for b in self.buckets if b.ratio == r) for r in ratios])
        with np.errstate(divide="ignore", invalid="ignore"):
            error = np.abs(np.log(np.where(known, w / h, 1.0))[:, None] - logs[None])  # (rows, ratios)
        nearest = np.argmin(error, axis=1)  # the first of equal errors
        aspect_ok = error[np.arange(len(w)), nearest] <= self.max_aspect_error + 1e-9
        frame = np.searchsorted(frames, np.where(known, n, 0), side="right") - 1  # the largest count <= n
        index = np.where(known & aspect_ok & (frame >= 0), nearest * len(frames) + frame, -1)
        reason = np.select([~known, ~aspect_ok, frame < 0], [UNFIT_REASONS.index(r) for r in ("unknown", "aspect",
                                                                                              "frames")], default=-1)
        return index, reason


def bucket_shape(ratio: float, size: int, multiple: int) -> tuple[int, int]:
    """(height, width) of aspect `ratio` at a stage of `size`: about size^2 pixels, both multiples of `multiple`."""
    height = multiple * max(1, math.floor(size / math.sqrt(ratio) / multiple + 0.5))
    width = multiple * max(1, math.floor(size * math.sqrt(ratio) / multiple + 0.5))
    return height, width


def stage_buckets(config: BucketConfig, stage: CurriculumStage, multiple: int) -> StageBuckets | None:
    """The stage's buckets (see the module's size rule), or None when no buckets are configured."""
    if not config.aspect_ratios:
        return None
    shapes: dict[tuple[int, int], str] = {}
    for text in config.aspect_ratios:
        shapes.setdefault(bucket_shape(parse_ratio(text), stage.size, multiple), text)  # first name kept
    frames = sorted(set(stage.bucket_frames or [stage.num_frames]))
    buckets = tuple(Bucket(ratio, f, h, w) for (h, w), ratio in shapes.items() for f in frames)
    return StageBuckets(stage, buckets, config.max_aspect_error)


def sample_shape(config: BucketConfig, stage: CurriculumStage, multiple: int) -> tuple[int, int, int]:
    """(frames, height, width) that samples of a stage are drawn at: its first bucket (the first listed ratio, the
    largest frame count), or its square without buckets."""
    buckets = stage_buckets(config, stage, multiple)
    if buckets is None:
        return stage.num_frames, stage.size, stage.size
    first = [b for b in buckets.buckets if b.ratio == buckets.buckets[0].ratio]
    return first[-1].num_frames, first[-1].height, first[-1].width


def bucket_identity(buckets: StageBuckets | None) -> dict:
    """What a latent cache records of a stage's buckets (nothing without buckets, so square caches keep theirs)."""
    if buckets is None:
        return {}
    return {"buckets": [[b.ratio, b.num_frames, b.height, b.width] for b in buckets.buckets],
            "max_aspect_error": buckets.max_aspect_error}


def _permutation(key: tuple, n: int) -> np.ndarray:
    """A permutation of range(n) from `key`, stable across NumPy releases (as training.dataset._permutation)."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return np.argsort(np.random.PCG64(int.from_bytes(digest[:16], "little")).random_raw(n), kind="stable")


class BucketSampler:
    """Which (row, window) items rank `rank` sees at micro-batch k of a bucketed stage: a pure function of (seed,
    stage, epoch, rank, k) and the table's metadata, like StageSampler, with every micro-batch from one bucket.

    Each epoch: the items in a seeded permutation, grouped by bucket in that order, each group cut into micro-batches
    of `batch_size` (a group's remainder is dropped); the micro-batches in a second seeded permutation; rank r takes
    the r-th of `world_size` equal slices. The number of micro-batches per epoch is the same every epoch."""

    def __init__(self, metadata: dict, buckets: StageBuckets, windows_per_clip: int, seed: int, rank: int,
                 world_size: int, batch_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.buckets, self.stage = buckets, buckets.stage
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.row_bucket: dict[int, int] = {}
        self.unfit: Counter = Counter({reason: 0 for reason in UNFIT_REASONS})
        self.items: list[tuple[int, int]] = []
        self.item_bucket: list[int] = []
        columns = [metadata[c] for c in ("width", "height", "num_frames", "fps")]
        index, reason = buckets.fit_all(*columns)
        for r, count in zip(*np.unique(reason[reason >= 0], return_counts=True), strict=True):
            self.unfit[UNFIT_REASONS[int(r)]] += int(count)
        rows = np.flatnonzero(index >= 0)
        self.row_bucket = dict(zip(rows.tolist(), index[rows].tolist(), strict=True))
        if windows_per_clip == 1:  # one window each: a clip fits only a frame count it fills (window_indices' rule)
            self.items, self.item_bucket = [(row, 0) for row in self.row_bucket], list(self.row_bucket.values())
        for row, b in self.row_bucket.items() if windows_per_clip > 1 else ():
            spans = window_indices(columns[2][row], columns[3][row], buckets.buckets[b].num_frames, self.stage.fps,
                                   windows_per_clip)
            self.items.extend((row, w) for w in range(len(spans)))
            self.item_bucket.extend([b] * len(spans))
        self.fitted = True  # clips were fitted here (not given with their buckets): report() counts them
        self._split(f"{len(columns[0])} curated clips, {sum(self.unfit.values())} fit no bucket")

    @classmethod
    def over_items(cls, items: list[tuple[int, int]], item_bucket: list[int], buckets: StageBuckets, seed: int,
                   rank: int, world_size: int, batch_size: int, source: str) -> BucketSampler:
        """The same replayable order over items whose buckets are given (a latent cache's rows of the stage, by
        their latents' shape)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        sampler = cls.__new__(cls)
        sampler.buckets, sampler.stage = buckets, buckets.stage
        sampler.seed, sampler.rank, sampler.world_size, sampler.batch_size = seed, rank, world_size, batch_size
        sampler.row_bucket, sampler.unfit = {}, Counter({reason: 0 for reason in UNFIT_REASONS})
        sampler.items, sampler.item_bucket, sampler.fitted = list(items), list(item_bucket), False
        sampler._split(source)
        return sampler

    def _split(self, source: str) -> None:
        self._bucket_array = np.asarray(self.item_bucket, dtype=np.int64)
        sizes = np.bincount(self._bucket_array) if len(self.items) else np.zeros(0, np.int64)
        # where each micro-batch starts in an epoch's items grouped bucket by bucket (the same every epoch)
        ends = np.cumsum(sizes)
        self._starts = np.concatenate([np.arange(end - size, end - self.batch_size + 1, self.batch_size)
                                       for size, end in zip(sizes, ends, strict=True)] or [np.zeros(0, np.int64)])
        self.batches_total = len(self._starts)
        self.batches_per_epoch = self.batches_total // self.world_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"curriculum stage {self.stage.name!r}: its buckets fill {self.batches_total} micro-batches of "
                f"{self.batch_size} from {len(self.items)} training clips ({source}), fewer than {self.world_size} "
                "workers: lower deepspeed.micro_batch_size or scaling.num_workers, add buckets, or curate more videos")
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def bucket_of(self, row: int) -> Bucket:
        return self.buckets.buckets[self.row_bucket[row]]

    def clips_per_bucket(self) -> dict[str, int]:
        """Training clips (items) per bucket name."""
        counts = Counter(self.item_bucket)
        return {self.buckets.buckets[i].name: counts[i] for i in sorted(counts)}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the epoch's item order; the same positions grouped bucket by bucket, each bucket in that order; the
        epoch's micro-batches in order, as starts into the grouped positions)."""
        cached = self._epochs.get(epoch)
        if cached is not None:
            return cached
        order = _permutation((int(self.seed), self.stage.name, int(epoch)), len(self.items))
        grouped = order[np.argsort(self._bucket_array[order], kind="stable")]
        shuffle = _permutation((int(self.seed), self.stage.name, int(epoch), "batches"), len(self._starts))
        self._epochs[epoch] = cached = (order, grouped, self._starts[shuffle])
        if len(self._epochs) > 2:  # the current epoch and the next, which prefetching reaches first
            self._epochs.popitem(last=False)
        return cached

    def _batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's item order, micro-batch k's positions into `items`)."""
        if k < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {k}")
        epoch, b = divmod(k, self.batches_per_epoch)
        order, grouped, starts = self._epoch(epoch)
        start = starts[self.rank * self.batches_per_epoch + b]
        return order, grouped[start:start + self.batch_size]

    def batch_items(self, k: int) -> list[tuple[int, int]]:
        """Micro-batch k (0-based from the stage's start, across epochs): all from one bucket."""
        return [self.items[i] for i in self._batch(k)[1]]

    def substitutes(self, k: int, j: int) -> Iterator[tuple[int, int]]:
        """Stand-ins for item j of micro-batch k when its clip cannot be decoded: the items of the same bucket after
        it in the epoch's order, wrapping around; the same on every run."""
        order, positions = self._batch(k)
        bucket = self.item_bucket[positions[j]]
        same = order[self._bucket_array[order] == bucket]
        at = int(np.flatnonzero(same == positions[j])[0])
        for i in range(1, len(same)):
            yield self.items[same[(at + i) % len(same)]]

    def report(self) -> dict[str, float]:
        """What the stage's bucketing did, as MLflow metrics: clips per reason they fit no bucket, and per bucket
        (nothing for items given with their buckets: `reelforge encode` counted those clips)."""
        if not self.fitted:
            return {}
        name = self.stage.name
        metrics = {f"buckets.{name}.unfit_{reason}": float(self.unfit[reason]) for reason in UNFIT_REASONS}
        metrics[f"buckets.{name}.fit_clips"] = float(len(self.row_bucket))
        metrics |= {f"buckets.{name}.{bucket}": float(n) for bucket, n in self.clips_per_bucket().items()}
        return metrics

    def summary(self) -> str:
        """One log line: where the stage's clips went and how many fit no bucket (and why)."""
        if not self.fitted:
            return (f"stage {self.stage.name!r}: {len(self.items)} encoded windows in {len(set(self.item_bucket))} "
                    "buckets (clips that fit none were counted by `reelforge encode`)")
        unfit = sum(self.unfit.values())
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.unfit.items() if n) or "none"
        buckets = ", ".join(f"{b} {n}" for b, n in self.clips_per_bucket().items())
        return (f"stage {self.stage.name!r}: {len(self.row_bucket)} clips in buckets ({buckets} training clips); "
                f"{unfit} fit no bucket ({reasons}; aspect: further than buckets.max_aspect_error="
                f"{self.buckets.max_aspect_error:g} from every bucket, frames: shorter than the smallest frame count)")
