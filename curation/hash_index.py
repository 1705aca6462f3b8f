"""The frame-hash index that copy detection queries: kept clips' frame pHashes in a Lance dataset, split into bands.

    OUTPUT/frame_hashes.lance   clip_id, dataset_version, sample, band0 .. band2 (int32): one row per non-flat
                                sample (`sample`: its position in the clip's signature)

Multi-index hashing (Norouzi et al. 2012): a 64-bit hash is three bands of 21, 21 and 22 bits, and two hashes that
differ in few bits often agree on a whole band: at 4 differing bits a sample pair shares one with probability 0.55,
at 6 with 0.24. A copy aligns with its original on dozens of samples, so it shares bands with it on several samples
at one shift (or two neighbouring shifts: sampling grids out of phase); unrelated clips share a band value by chance
about 0.002 times a pair of 10 s clips. `band_hits` is that join, vectorised: sort the query's band values, and for
each stored row find its matches with `searchsorted`. Candidates with MIN_BAND_HITS at one shift are then verified
on their whole signatures (curation/phash.py `align`).

`HashIndex.candidates` streams the stored rows in batches (16 bytes and a clip_id a row), so its memory is one batch
plus the query, whatever the index's size; its time grows with the rows (one scan per dataset version).
"""

from __future__ import annotations

from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa

from curation.phash import FLAT

BAND_BITS = (21, 21, 22)  # most significant first
BANDS = len(BAND_BITS)
MIN_BAND_HITS = 3  # shared (sample, band) values at one shift, or two neighbouring ones, that make a candidate
SCAN_ROWS = 1 << 20  # stored rows per scan batch


def bands(hashes: np.ndarray) -> np.ndarray:
    """(n,) int64 hashes -> (n, BANDS) int32 bands."""
    values = np.asarray(hashes, np.int64).view(np.uint64)
    out = np.empty((len(values), BANDS), np.int32)
    shift = 64
    for b, bits in enumerate(BAND_BITS):
        shift -= bits
        out[:, b] = ((values >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int32)
    return out


@dataclass
class Samples:
    """The non-flat samples of some clips, one row each: which clip (an index into `clip_ids`), where in its
    signature, and its bands."""

    clip_ids: list[str]
    clip: np.ndarray  # (n,) int64
    position: np.ndarray  # (n,) int64
    bands: np.ndarray  # (n, BANDS) int32

    @classmethod
    def of(cls, signatures: dict[str, list[int]]) -> Samples:
        ids, clip, position, values = list(signatures), [], [], []
        for i, clip_id in enumerate(ids):
            hashes = np.asarray(signatures[clip_id] or [], np.int64)
            keep = np.flatnonzero(hashes != FLAT)
            clip.append(np.full(len(keep), i, np.int64))
            position.append(keep.astype(np.int64))
            values.append(hashes[keep])
        cat = (lambda parts, dtype: np.concatenate(parts) if parts else np.empty(0, dtype))  # noqa: E731
        return cls(ids, cat(clip, np.int64), cat(position, np.int64), bands(cat(values, np.int64)))


def band_hits(query: Samples, clip: np.ndarray, position: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """Every (query sample, stored row) pair that agrees on a band, as rows (query clip, stored row, shift), where
    shift = stored position - query position; `clip`/`position`/`stored` describe the stored rows."""
    found = []
    for b in range(BANDS):
        order = np.argsort(query.bands[:, b], kind="stable")
        sorted_values = query.bands[order, b]
        # searchsorted is several times faster on sorted needles (cache locality): sort, search, put back.
        needles = np.argsort(stored[:, b], kind="stable")
        lo, hi = np.empty(len(stored), np.int64), np.empty(len(stored), np.int64)
        lo[needles] = np.searchsorted(sorted_values, stored[needles, b], "left")
        hi[needles] = np.searchsorted(sorted_values, stored[needles, b], "right")
        counts = hi - lo
        rows = np.repeat(np.arange(len(stored)), counts)  # (pairs,)
        if not len(rows):
            continue
        starts = np.repeat(lo - np.cumsum(counts) + counts, counts)  # each row's lo, minus its first pair's index
        matched = order[starts + np.arange(len(rows))]  # (pairs,) query sample of each pair
        found.append(np.stack([query.clip[matched], rows, position[rows] - query.position[matched]], axis=1))
    return np.concatenate(found) if found else np.empty((0, 3), np.int64)


def strong_pairs(pairs: np.ndarray) -> np.ndarray:
    """(query clip, other clip, shift) hit rows -> the distinct (query clip, other clip) with MIN_BAND_HITS at one
    shift or at two neighbouring shifts together."""
    if not len(pairs):
        return np.empty((0, 2), np.int64)
    keys, counts = np.unique(pairs, axis=0, return_counts=True)  # sorted by clip, other, shift
    next_count = np.zeros_like(counts)
    same_pair = (keys[1:, 0] == keys[:-1, 0]) & (keys[1:, 1] == keys[:-1, 1]) & (keys[1:, 2] == keys[:-1, 2] + 1)
    next_count[:-1][same_pair] = counts[1:][same_pair]
    strong = keys[counts + next_count >= MIN_BAND_HITS]
    return np.unique(strong[:, :2], axis=0)


def _schema() -> pa.Schema:
    return pa.schema([("clip_id", pa.string()), ("dataset_version", pa.int64()), ("sample", pa.int32())]
                     + [(f"band{b}", pa.int32()) for b in range(BANDS)])


class HashIndex:
    """Kept clips' frame hashes by band. `add(version, ...)` replaces the rows of that version (a rerun of a
    version's finish adds nothing twice); `candidates` answers 'which earlier kept clips may be copies of these'."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options or None

    def _open(self) -> lance.LanceDataset | None:
        try:
            return lance.dataset(self.uri, storage_options=self.storage_options)
        except ValueError as err:
            if "not found" not in str(err):
                raise
            return None

    def __len__(self) -> int:
        ds = self._open()
        return ds.count_rows() if ds is not None else 0

    def add(self, version: int, signatures: dict[str, list[int]]) -> int:
        """The non-flat hashes of `signatures` (clip_id -> frame_hashes) as rows of `version`; returns the rows."""
        samples = Samples.of(signatures)
        ds = self._open()
        if ds is not None and ds.count_rows(f"dataset_version = {int(version)}"):
            ds.delete(f"dataset_version = {int(version)}")
        if not len(samples.clip):
            return 0
        ids = pa.array(samples.clip_ids, pa.string()).take(pa.array(samples.clip))
        table = pa.Table.from_arrays([ids, pa.array(np.full(len(ids), int(version), np.int64)),
                                      pa.array(samples.position.astype(np.int32))]
                                     + [pa.array(samples.bands[:, b]) for b in range(BANDS)], schema=_schema())
        lance.write_dataset(table, self.uri, mode="append" if ds is not None else "create",
                            storage_options=self.storage_options)
        return len(ids)

    def candidates(self, signatures: dict[str, list[int]], max_version: int) -> dict[str, set[str]]:
        """For each query clip (clip_id -> frame_hashes), the stored clips of dataset_version <= max_version that
        share MIN_BAND_HITS band values with it at one shift (see strong_pairs)."""
        found: dict[str, set[str]] = {clip_id: set() for clip_id in signatures}
        ds = self._open()
        query = Samples.of(signatures)
        if ds is None or not len(query.clip):
            return found
        hits = []
        for batch in ds.to_batches(columns=["clip_id", "sample"] + [f"band{b}" for b in range(BANDS)],
                                   filter=f"dataset_version <= {int(max_version)}", batch_size=SCAN_ROWS):
            stored = np.stack([batch.column(f"band{b}").to_numpy() for b in range(BANDS)], axis=1)
            pairs = band_hits(query, np.zeros(len(stored), np.int64), batch.column("sample").to_numpy(), stored)
            if not len(pairs):
                continue
            rows = np.unique(pairs[:, 1])
            names = np.asarray(batch.column("clip_id").take(pa.array(rows)).to_pylist(), dtype=object)
            hits.append((pairs, rows, names))
        # The same stored clip may span two batches: its rows are named, then numbered across all batches.
        if not hits:
            return found
        all_names = np.concatenate([names for _, _, names in hits])
        unique_names, codes = np.unique(all_names.astype(str), return_inverse=True)
        offset, coded = 0, []
        for pairs, rows, _ in hits:
            code = codes[offset:offset + len(rows)][np.searchsorted(rows, pairs[:, 1])]
            coded.append(np.stack([pairs[:, 0], code, pairs[:, 2]], axis=1))
            offset += len(rows)
        for q, other in strong_pairs(np.concatenate(coded)).tolist():
            found[query.clip_ids[q]].add(str(unique_names[other]))
        return found
