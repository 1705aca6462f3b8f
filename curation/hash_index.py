"""The frame-hash index that copy detection queries: kept clips' frame pHashes in a Lance dataset, split into bands.

    OUTPUT/frame_hashes.lance   clip_id, dataset_version, band0 .. band3 (int32): one row per non-flat sample

Multi-index hashing (Norouzi et al. 2012): a 64-bit hash is four 16-bit bands, and two hashes within 3 bits share at
least one band exactly. Copies differ by 0-6 bits a sample over many samples, so a copy of a clip shares a band with
it on some samples with near certainty; `candidates` finds, with one filtered scan per chunk of query clips (a BTREE
index per band once the table is large), the earlier clips that share any band with a new clip. Those candidates
are then verified on their whole signatures (curation/phash.py `align`), so the index only has to not miss them.
"""

from __future__ import annotations

import lance
import numpy as np
import pyarrow as pa

from curation.phash import FLAT

BANDS = 4
BAND_BITS = 16
MIN_INDEX_ROWS = 50_000  # below this a scan is as fast as the BTREE lookups
QUERY_CLIPS = 256  # query clips per Lance scan: bounds the IN lists
# A candidate shares at least this many (sample, band) values with the query: one shared 16-bit band happens by
# chance (about 0.1 times per pair of unrelated 10 s clips), a copy shares dozens.
MIN_BAND_HITS = 2


def bands(hashes: np.ndarray) -> np.ndarray:
    """(n,) int64 hashes -> (n, BANDS) int32 16-bit bands, the most significant first."""
    values = np.asarray(hashes, np.int64).view(np.uint64)
    shifts = np.arange(BANDS - 1, -1, -1, dtype=np.uint64) * np.uint64(BAND_BITS)
    return ((values[:, None] >> shifts[None, :]) & np.uint64(0xFFFF)).astype(np.int32)


def _schema() -> pa.Schema:
    return pa.schema([("clip_id", pa.string()), ("dataset_version", pa.int64())]
                     + [(f"band{b}", pa.int32()) for b in range(BANDS)])


class HashIndex:
    """Kept clips' frame hashes by band. `add(version, ...)` replaces the rows of that version (a rerun of a
    version's finish adds nothing twice); `candidates` answers 'which earlier kept clips share a band with these'."""

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
        ids, rows = [], []
        for clip_id, hashes in signatures.items():
            usable = np.asarray([h for h in hashes or [] if h != FLAT], np.int64)
            if len(usable):
                ids += [clip_id] * len(usable)
                rows.append(bands(usable))
        ds = self._open()
        if ds is not None and ds.count_rows(f"dataset_version = {int(version)}"):
            ds.delete(f"dataset_version = {int(version)}")
        if not ids:
            return 0
        stacked = np.concatenate(rows)
        table = pa.Table.from_arrays([pa.array(ids, pa.string()), pa.array([int(version)] * len(ids), pa.int64())]
                                     + [pa.array(stacked[:, b]) for b in range(BANDS)], schema=_schema())
        lance.write_dataset(table, self.uri, mode="append" if ds is not None else "create",
                            storage_options=self.storage_options)
        self._index()
        return len(ids)

    def _index(self) -> None:
        """A BTREE index per band once the table is large; later rows join it (optimize_indices), and rows not yet
        in it are scanned, so answers never depend on it."""
        ds = self._open()
        if ds is None or ds.count_rows() < MIN_INDEX_ROWS:
            return
        names = {i.name for i in ds.describe_indices()}
        if all(f"band{b}_idx" in names for b in range(BANDS)):
            ds.optimize.optimize_indices()
            return
        for b in range(BANDS):
            ds.create_scalar_index(f"band{b}", "BTREE", name=f"band{b}_idx", replace=True)

    def candidates(self, signatures: dict[str, list[int]], max_version: int) -> dict[str, set[str]]:
        """For each query clip (clip_id -> frame_hashes), the indexed clips of dataset_version <= max_version that
        share at least MIN_BAND_HITS band values with its non-flat hashes.

        Scale: a band value matches about rows / 65,536 unrelated rows, so the rows read grow with the index: about
        600 per query value at a million 10 s clips (40 samples each). Past that, longer bands are the next step."""
        ds = self._open()
        found: dict[str, set[str]] = {clip_id: set() for clip_id in signatures}
        if ds is None:
            return found
        ids = list(signatures)
        for start in range(0, len(ids), QUERY_CLIPS):
            chunk = {clip_id: signatures[clip_id] for clip_id in ids[start:start + QUERY_CLIPS]}
            lookup = band_lookup(chunk)
            clauses = [f"band{b} IN ({', '.join(str(v) for v in sorted(lookup[b]))})"
                       for b in range(BANDS) if lookup[b]]
            if not clauses:
                continue
            table = ds.to_table(columns=["clip_id"] + [f"band{b}" for b in range(BANDS)],
                                filter=f"dataset_version <= {int(max_version)} AND ({' OR '.join(clauses)})")
            columns = [table[f"band{b}"].to_numpy() for b in range(BANDS)]
            hits: dict[tuple[str, str], int] = {}
            for row, clip_id in enumerate(table["clip_id"].to_pylist()):
                for b in range(BANDS):
                    for query in lookup[b].get(int(columns[b][row]), ()):
                        hits[query, clip_id] = hits.get((query, clip_id), 0) + 1
            for (query, clip_id), count in hits.items():
                if count >= MIN_BAND_HITS:
                    found[query].add(clip_id)
        return found


def band_lookup(signatures: dict[str, list[int]]) -> list[dict[int, set[str]]]:
    """Per band: band value -> the query clips that have it."""
    lookup: list[dict[int, set[str]]] = [{} for _ in range(BANDS)]
    for clip_id, hashes in signatures.items():
        usable = np.asarray([h for h in hashes or [] if h != FLAT], np.int64)
        if not len(usable):
            continue
        for b, column in enumerate(bands(usable).T):
            for value in set(column.tolist()):
                lookup[b].setdefault(value, set()).add(clip_id)
    return lookup
