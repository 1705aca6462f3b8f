"""Exact, replayable training reads: a seeded permutation of (row, window) items per epoch, split by rank, rows
fetched by index from the `shards` Lance table of one curated dataset version and decoded in background threads,
so micro-batch k of a stage depends only on (seed, stage, epoch, rank, k) and a resumed run sees the batches an
uninterrupted one would. `--data DIR@v3` reads version 3 the same way, to reproduce an old run."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import av
import numpy as np

from training.buckets import BucketSampler, StageBuckets
from training.clip_table import METADATA_COLUMNS, ClipTable, content_id, pin_version  # noqa: F401 (re-exported)
from training.config import CurriculumStage, DataConfig
from training.data import decode_row, window_indices

log = logging.getLogger("reelforge.train.dataset")


def _permutation(seed: int, stage: CurriculumStage, epoch: int, n: int) -> np.ndarray:
    """A permutation of range(n) from (seed, stage name, epoch). Sorting raw PCG64 output rather than calling
    Generator.permutation: NumPy keeps bit generator streams fixed across releases, not Generator methods, and a
    resume must not change order with a NumPy upgrade."""
    digest = hashlib.sha256(repr((int(seed), stage.name, int(epoch))).encode()).digest()
    keys = np.random.PCG64(int.from_bytes(digest[:16], "little")).random_raw(n)
    return np.argsort(keys, kind="stable")


class StageSampler:
    """Which (row, window) items rank `rank` sees at micro-batch k of a curriculum stage: a pure function of (seed,
    stage, epoch, rank, k).

    Each epoch is a permutation of every item valid for the stage, seeded by (seed, stage name, epoch); rank r takes
    the r-th of `world_size` equal slices of it (the remainder that fills no whole micro-batch on every rank is
    dropped), consecutive `batch_size` items per micro-batch."""

    def __init__(self, table_metadata: dict, stage: CurriculumStage, windows_per_clip: int, seed: int, rank: int,
                 world_size: int, batch_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.stage, self.seed, self.rank, self.world_size, self.batch_size = stage, seed, rank, world_size, batch_size
        self.items: list[tuple[int, int]] = []
        frames, fps = table_metadata["num_frames"], table_metadata["fps"]
        for row, (n, src_fps) in enumerate(zip(frames, fps, strict=True)):
            if n is None or src_fps is None:
                continue
            windows = window_indices(n, src_fps, stage.num_frames, stage.fps, windows_per_clip)
            self.items.extend((row, w) for w in range(len(windows)))
        self._split(f"{len(frames)} curated clips")

    @classmethod
    def over_items(cls, items: list[tuple[int, int]], stage: CurriculumStage, seed: int, rank: int, world_size: int,
                   batch_size: int, source: str) -> StageSampler:
        """The same replayable order over items given as they are (a latent cache's rows of the stage)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        sampler = cls.__new__(cls)
        sampler.stage, sampler.seed, sampler.rank = stage, seed, rank
        sampler.world_size, sampler.batch_size, sampler.items = world_size, batch_size, list(items)
        sampler._split(source)
        return sampler

    def _split(self, source: str) -> None:
        stage, world_size, batch_size = self.stage, self.world_size, self.batch_size
        self.batches_per_epoch = len(self.items) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"curriculum stage {stage.name!r}: {len(self.items)} training clips fit its {stage.num_frames} "
                f"frames at {stage.fps:g} fps ({source}), fewer than {world_size} workers x "
                f"micro-batch {batch_size}: lower deepspeed.micro_batch_size or scaling.num_workers, or curate more "
                "videos")
        self._per_rank = self.batches_per_epoch * batch_size
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Positions into `items` of the whole epoch (every rank's slice, then the dropped remainder)."""
        order = self._orders.get(epoch)
        if order is None:
            order = _permutation(self.seed, self.stage, epoch, len(self.items))
            self._orders[epoch] = order
            if len(self._orders) > 2:  # the current epoch and the next, which prefetching reaches first
                self._orders.popitem(last=False)
        return order

    def _position(self, k: int) -> tuple[int, int]:
        if k < 0:
            raise ValueError(f"micro-batch index must be >= 0, got {k}")
        epoch, b = divmod(k, self.batches_per_epoch)
        return epoch, self.rank * self._per_rank + b * self.batch_size

    def batch_items(self, k: int) -> list[tuple[int, int]]:
        """Micro-batch k (0-based from the stage's start, across epochs): epoch k // batches_per_epoch."""
        epoch, start = self._position(k)
        return [self.items[i] for i in self.epoch_order(epoch)[start:start + self.batch_size]]

    def substitutes(self, k: int, j: int) -> Iterator[tuple[int, int]]:
        """Stand-ins for item j of micro-batch k when its clip cannot be decoded: the items after it in the same
        epoch's order, wrapping around; the same on every run, so batches stay full and replayable."""
        epoch, start = self._position(k)
        order = self.epoch_order(epoch)
        for i in range(1, len(order)):
            yield self.items[order[(start + j + i) % len(order)]]


class StageLoader:
    """Decoded micro-batches of one stage for one rank, prefetched in background threads, deterministic.

    `batch(k)` starts decoding micro-batches k+1 .. k+prefetch_batches in a thread pool (PyAV releases the GIL);
    one decode of a row gives all of its windows. With `config.cache` decoded rows are kept (up to `cache_bytes`,
    least recently used out first) so later epochs do not decode again. The result of batch(k) depends on neither
    thread timing nor the cache, only on the sampler's items and the bytes of the rows. With `buckets`
    (training/buckets.py) each micro-batch comes from one bucket and each row is decoded at its bucket's shape."""

    def __init__(self, table: ClipTable, stage: CurriculumStage, config: DataConfig, seed: int, rank: int,
                 world_size: int, batch_size: int, cache_bytes: int = 2**30, buckets: StageBuckets | None = None):
        self.table, self.stage, self.config, self.buckets = table, stage, config, buckets
        self.sampler = (StageSampler(table.metadata(), stage, config.windows_per_clip, seed, rank, world_size,
                                     batch_size) if buckets is None else
                        BucketSampler(table.metadata(), buckets, config.windows_per_clip, seed, rank, world_size,
                                      batch_size))
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.cache_bytes = cache_bytes if config.cache else 0
        threads = config.decode_concurrency or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix=f"decode-{stage.name}")
        self._rows: OrderedDict[int, Future] = OrderedDict()  # row -> its windows (None: undecodable)
        self._row_bytes: dict[int, int] = {}
        self._pending: dict[int, list[tuple[int, int]]] = {}  # micro-batch -> items, decoding under way
        self._bad: set[int] = set()

    def batch(self, k: int) -> tuple[np.ndarray, list[str]]:
        """Micro-batch k: (B, T, H, W, 3) uint8 and the captions."""
        for stale in [j for j in self._pending if not k <= j <= k + self.config.prefetch_batches]:
            del self._pending[stale]
        for j in range(k, k + 1 + max(0, self.config.prefetch_batches)):
            if j not in self._pending:
                self._pending[j] = items = self.sampler.batch_items(j)
                for row, _ in items:
                    self._submit(row)
        items = self._pending.pop(k)
        clips, captions = [], []
        for j, item in enumerate(items):
            clip, row = self._clip(item)
            if clip is None:
                for substitute in self.sampler.substitutes(k, j):
                    clip, row = self._clip(substitute)
                    if clip is not None:
                        break
                else:
                    raise ValueError(f"{self.table.shown}: no clip of stage {self.stage.name!r} can be decoded")
            clips.append(clip)
            captions.append(self._captions[row] or "")
        self._release()
        return np.stack(clips), captions

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._rows.clear()
        self._pending.clear()

    def __enter__(self) -> StageLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _captions(self) -> list:
        return self.table.metadata()["caption"]

    def _submit(self, row: int) -> Future:
        future = self._rows.get(row)
        if future is None:
            future = self._rows[row] = self._pool.submit(self._decode, row)
        else:
            self._rows.move_to_end(row)
        return future

    def _decode(self, row: int) -> list[np.ndarray] | None:
        if row in self._bad:
            return None
        (data,) = self.table.take([row])
        try:
            bucket = None if self.buckets is None else self.sampler.bucket_of(row)
            return decode_row(data, self.stage, self.config.windows_per_clip, bucket)
        except (av.error.FFmpegError, ValueError, IndexError) as err:
            log.warning("clip %s (row %d) cannot be decoded, a later clip of the epoch stands in: %s",
                        data["clip_id"], row, err)
            self._bad.add(row)
            return None

    def _clip(self, item: tuple[int, int]) -> tuple[np.ndarray | None, int]:
        row, window = item
        windows = self._submit(row).result()
        return (None if windows is None else windows[window]), row

    def _release(self) -> None:
        """Forget decoded rows no prefetched batch needs: all of them without the cache, else the least recently
        used beyond its budget."""
        needed = {row for items in self._pending.values() for row, _ in items}
        if not self.config.cache:
            for row in [r for r in self._rows if r not in needed]:
                del self._rows[row]
                self._row_bytes.pop(row, None)
            return
        held = sum(self._size(row) for row in self._rows)
        for row in list(self._rows):  # least recently used first
            if held <= self.cache_bytes:
                break
            if row not in needed:
                held -= self._size(row)
                del self._rows[row]
                self._row_bytes.pop(row, None)

    def _size(self, row: int) -> int:
        if row not in self._row_bytes:
            future = self._rows[row]
            if not future.done() or future.cancelled() or future.exception() is not None:
                return 0
            self._row_bytes[row] = sum(w.nbytes for w in future.result() or [])
        return self._row_bytes[row]
