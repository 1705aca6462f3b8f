"""Exact, replayable training reads: a seeded permutation of (row, window) items per epoch, split by rank, rows
fetched by index from the curated table and decoded in background threads, so micro-batch k of a stage depends only
on (seed, stage, epoch, rank, k) and a resumed run sees the batches an uninterrupted one would."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Lock
from typing import TYPE_CHECKING

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from training.config import CurriculumStage, DataConfig
from training.data import SHARD_COLUMNS, decode_row, shard_entries, window_indices

if TYPE_CHECKING:
    from curation.outputs import OutputDir

log = logging.getLogger("reelforge.train.dataset")

METADATA_COLUMNS = ["clip_id", "num_frames", "fps", "caption"]


class ClipTable:
    """The read side of a curated dataset: the kept clips, random access by row index.

    Rows are numbered in manifest order (every version's shard files, each file's rows in order). Today the table
    is the Parquet shards: an index maps a row to (file, row group, offset) and whole row groups are read and kept
    while recent (`cache_bytes`), since Parquet cannot read less than a row group of a column."""

    def __init__(self, data_uri: str, version: str, out: OutputDir, paths: list[str], metas: list[pq.FileMetaData],
                 cache_bytes: int = 256 * 2**20):
        self.data_uri = data_uri
        self._version = version
        self._fs = out.fs
        self._paths = paths
        self._metas = metas
        self._groups: list[tuple[int, int]] = []  # (file, row group) in row order
        starts = []
        total = 0
        for f, meta in enumerate(metas):
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    self._groups.append((f, g))
                    starts.append(total)
                    total += rows
        self._starts = starts
        self._rows = total
        self._columns = [[c for c in SHARD_COLUMNS if c in meta.schema.to_arrow_schema().names] for meta in metas]
        self._cache: OrderedDict[tuple[int, int], Future] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._lock = Lock()
        self._metadata: dict[str, list] | None = None

    @classmethod
    def open(cls, data_uri: str, cache_bytes: int = 256 * 2**20) -> ClipTable:
        """The kept clips of the curated output `data_uri` (local path or URI) as listed by its manifest."""
        from curation.outputs import OutputDir
        from curation.redact import redact_uri

        manifest, entries = shard_entries(data_uri)  # one manifest read; the clear errors: no manifest, no clips
        shown = redact_uri(data_uri)
        out = OutputDir(data_uri)
        paths = [out.path(f["path"]) for f in entries]  # paths on out.fs, which keeps the URI's endpoint and keys

        def footer(path: str) -> pq.FileMetaData:
            try:
                with out.fs.open_input_file(path) as f:
                    return pq.ParquetFile(f).metadata
            except FileNotFoundError:
                raise FileNotFoundError(f"{shown}: shard {path} listed in manifest.json is missing; "
                                        "the curated dataset is incomplete, curate it again") from None

        with ThreadPoolExecutor(8) as pool:  # one small read per file, latency-bound on object stores
            metas = list(pool.map(footer, paths))
        for entry, meta in zip(entries, metas, strict=True):
            if meta.num_rows != entry["rows"]:
                raise ValueError(f"{shown}: shard {entry['path']} holds {meta.num_rows} rows but manifest.json "
                                 f"lists {entry['rows']}; the file was changed after curation, curate again")
        listing = json.dumps([[f["path"], f["rows"], f.get("sha256")] for f in entries]).encode()
        latest = manifest.get("dataset_version", max(v["version"] for v in manifest["versions"]))
        version = f"v{latest}-{hashlib.sha256(listing).hexdigest()[:12]}"
        return cls(data_uri, version, out, paths, metas, cache_bytes)

    def __len__(self) -> int:
        return self._rows

    @property
    def version(self) -> str:
        """Which rows, exactly: the manifest's latest version and a hash of the shard files and their row counts."""
        return self._version

    def metadata(self) -> dict[str, list]:
        """clip_id, num_frames, fps and caption of every row, in row order (no video bytes are read)."""
        if self._metadata is None:
            columns: dict[str, list] = {c: [] for c in METADATA_COLUMNS}
            for path, meta in zip(self._paths, self._metas, strict=True):
                names = meta.schema.to_arrow_schema().names
                with self._fs.open_input_file(path) as f:
                    table = pq.ParquetFile(f, metadata=meta).read(columns=[c for c in METADATA_COLUMNS if c in names])
                for c in METADATA_COLUMNS:
                    columns[c].extend(table[c].to_pylist() if c in names else [None] * table.num_rows)
            self._metadata = columns
        return self._metadata

    def take(self, indices: Sequence[int]) -> list[dict]:
        """Full rows (training.data.SHARD_COLUMNS, video bytes included) in the order of `indices`; thread-safe."""
        rows = []
        for index in indices:
            index = int(index)
            if not 0 <= index < self._rows:
                raise IndexError(f"row {index} is out of range for a table of {self._rows} rows")
            g = bisect_right(self._starts, index) - 1
            table = self._row_group(g)
            row = table.slice(index - self._starts[g], 1).to_pylist()[0]
            rows.append({c: row.get(c) for c in SHARD_COLUMNS})
        return rows

    def _row_group(self, g: int) -> pa.Table:
        """Row group g (in row order), read once by whichever thread asks first; the others wait for that read."""
        key = self._groups[g]
        with self._lock:
            future = self._cache.get(key)
            owner = future is None
            if owner:
                future = self._cache[key] = Future()
            else:
                self._cache.move_to_end(key)
        if owner:
            f, group = key
            try:
                with self._fs.open_input_file(self._paths[f]) as handle:
                    table = pq.ParquetFile(handle, metadata=self._metas[f]).read_row_group(group,
                                                                                           self._columns[f])
            except BaseException as err:
                with self._lock:
                    self._cache.pop(key, None)
                future.set_exception(err)
                raise
            future.set_result(table)
            self._evict(keep=key)
        return future.result()

    def _evict(self, keep: tuple[int, int]) -> None:
        with self._lock:
            done = [(k, v) for k, v in self._cache.items() if v.done() and not v.exception()]
            held = sum(v.result().nbytes for _, v in done)
            for k, v in done:  # oldest first
                if held <= self._cache_bytes:
                    break
                if k != keep:
                    held -= v.result().nbytes
                    del self._cache[k]


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
        self.batches_per_epoch = len(self.items) // world_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"curriculum stage {stage.name!r}: {len(self.items)} training clips fit its {stage.num_frames} "
                f"frames at {stage.fps:g} fps ({len(frames)} curated clips), fewer than {world_size} workers x "
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
    thread timing nor the cache, only on the sampler's items and the bytes of the rows."""

    def __init__(self, table: ClipTable, stage: CurriculumStage, config: DataConfig, seed: int, rank: int,
                 world_size: int, batch_size: int, cache_bytes: int = 2**30):
        self.table, self.stage, self.config = table, stage, config
        self.sampler = StageSampler(table.metadata(), stage, config.windows_per_clip, seed, rank, world_size,
                                    batch_size)
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
                    raise ValueError(f"{self.table.data_uri}: no clip of stage {self.stage.name!r} can be decoded")
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
            return decode_row(data, self.stage, self.config.windows_per_clip)
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
