"""The clip-embedding index that semantic deduplication queries: a Lance dataset keyed by clip_id, searched by cosine
distance, with an IVF_PQ index once it holds enough rows for one to pay off.

    OUTPUT/embeddings.lance   clip_id, video_id, dataset_version, embedding (fixed_size_list<float32, D>)

Distances are Lance's cosine distance, 1 - cos(a, b), from 0 (same direction) to 2 (so the vectors' norms do not
matter). With an index the candidates are re-ranked on the stored vectors (`refine_factor`), so the distances returned
are exact, not PQ estimates: a dedup threshold means the same thing with or without an index.
"""

from __future__ import annotations

import math

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NAME = "embeddings.lance"  # beside a curated dataset's tables (OUTPUT/embeddings.lance)
KEY = "clip_id"
COLUMN = "embedding"
INDEX_NAME = "embedding_idx"
METRIC = "cosine"
# Below this many rows build() makes no index: a brute-force search is exact and, measured on 2 cores with 768-d
# vectors (batches of 100 queries), answers ~200 queries/s at 5k rows and 70 to 100 at 20k (IVF_PQ: ~250 at 20k),
# while training an index there costs 10 to 20 s. Brute force falls to ~45 queries/s at 50k rows and 14 at 100k.
MIN_INDEX_ROWS = 10_000
REFINE_FACTOR = 10  # with an index: re-rank k * 10 candidates on the stored vectors (exact distances, PQ errors fixed)
MAX_DELTAS = 8  # index segments (the trained one and its deltas) before build() merges them
QUERY_BATCH = 256  # query vectors per Lance call: bounds the memory of a brute-force batch search


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema([
        (KEY, pa.string()),
        ("video_id", pa.string()),
        ("dataset_version", pa.int64()),
        (COLUMN, pa.list_(pa.float32(), dim)),
    ])


def default_partitions(rows: int) -> int:
    """IVF partitions: the square root of the row count (LanceDB's default), so a query's two steps, picking
    partitions and scanning them, cost about the same; at most one per 256 rows, as Lance trains no more (below
    65,536 rows this is the limit: 46 partitions for 12,000 rows)."""
    return max(1, min(round(math.sqrt(rows)), rows // 256))


def default_sub_vectors(dim: int) -> int:
    """PQ sub-vectors: 16 dimensions each where D allows, else 8 (the sizes Lance's SIMD kernels are made for)."""
    for width in (16, 8):
        if dim % width == 0:
            return dim // width
    return 1


def _usable_rows(table: pa.Table) -> pa.Table:
    """The index's columns of the rows that have an embedding (not null, not empty), each clip_id once (its first
    row): Lance's insert would otherwise add a clip_id repeated within one batch twice."""
    missing = [name for name in (KEY, "video_id", "dataset_version", COLUMN) if name not in table.column_names]
    if missing:
        raise ValueError(f"embedding rows need the columns {', '.join(missing)} (got {', '.join(table.column_names)})")
    table = table.select([KEY, "video_id", "dataset_version", COLUMN])
    if table["dataset_version"].null_count:
        raise ValueError(f"{table['dataset_version'].null_count} embedding rows have no dataset_version; every row "
                         "needs the version that adds it")
    lengths = pc.list_value_length(table[COLUMN])
    table = table.filter(pc.fill_null(pc.greater(lengths, 0), False))
    first: dict[str, int] = {}
    for i, clip_id in enumerate(table[KEY].to_pylist()):
        first.setdefault(clip_id, i)
    return table if len(first) == table.num_rows else table.take(list(first.values()))


def _fixed_size(table: pa.Table, dim: int, shown: str) -> pa.Table:
    """`table` with its embeddings as fixed_size_list<float32, dim>; a one-line error when any has another size."""
    column = table[COLUMN].combine_chunks()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dim)
    if len(wrong):
        raise ValueError(f"{shown} holds {dim}-d embeddings but {len(wrong)} of the rows added have "
                         f"{lengths[wrong[0]]} (first: clip_id {table[KEY][int(wrong[0])]}); embeddings of another "
                         "model belong in a new index")
    values = column.flatten().cast(pa.float32())
    vectors = pa.FixedSizeListArray.from_arrays(values, dim)
    return pa.Table.from_arrays([table[KEY], table["video_id"], table["dataset_version"].cast(pa.int64()), vectors],
                                schema=embedding_schema(dim))


Hit = tuple[str, float, int]  # clip_id, distance, dataset_version


def _search(ds: lance.LanceDataset, queries: np.ndarray, search: dict, where: str | None) -> list[list[Hit]]:
    """One Lance batch search (`where` filtered before it) as one nearest-first list of hits per query."""
    result = ds.to_table(columns=[KEY, "dataset_version", "_distance"], filter=where, prefilter=True,
                         nearest={**search, "q": queries})
    found: list[list[Hit]] = [[] for _ in range(len(queries))]
    index = result["query_index"].to_pylist() if "query_index" in result.column_names else [0] * result.num_rows
    for q, clip_id, version, distance in zip(index, result[KEY].to_pylist(), result["dataset_version"].to_pylist(),
                                             result["_distance"].to_pylist(), strict=True):
        found[q].append((clip_id, distance, version))
    return [sorted(hits, key=lambda hit: hit[1]) for hits in found]


def _search_older(ds: lance.LanceDataset, queries: np.ndarray, search: dict, max_version: int,
                  newer: int) -> list[list[Hit]]:
    """The k nearest rows of dataset_version <= max_version, `newer` rows being above it. A Lance prefilter costs
    ~35 ms a query at 1M rows (it builds the allowed row set per query), so this searches all rows for up to 2k
    neighbours and drops the newer ones; only queries left with fewer than k are searched again, prefiltered."""
    k = search["k"]
    hits = _search(ds, queries, {**search, "k": k + min(newer, k)}, None)
    hits = [[hit for hit in found if hit[2] <= max_version][:k] for found in hits]
    short = [i for i, found in enumerate(hits) if len(found) < k]
    if short:
        again = _search(ds, queries[short], search, f"dataset_version <= {int(max_version)}")
        for i, found in zip(short, again, strict=True):
            hits[i] = found
    return hits


class EmbeddingIndex:
    """L2-normalised clip embeddings keyed by clip_id, and the nearest-neighbour queries dedup makes against them.

    `add` inserts rows whose clip_id is not there yet (a rerun adds nothing); `build` makes or extends the IVF_PQ
    index; `nearest(vectors, k, max_version=N - 1)` finds, for version N's new clips, their nearest clips among all
    earlier versions in one call. Rows added after `build` are searched too (brute force) until the next `build`."""

    def __init__(self, uri: str, storage_options: dict | None = None):
        self.uri = uri
        self.storage_options = storage_options or None
        self._dataset: lance.LanceDataset | None = None

    @classmethod
    def beside(cls, location: str, storage_options: dict | None = None) -> EmbeddingIndex:
        """The index of the curated dataset at `location` (a directory or URI holding its tables)."""
        return cls(f"{location.rstrip('/')}/{NAME}", storage_options)

    def _open(self) -> lance.LanceDataset | None:
        if self._dataset is None:
            try:
                self._dataset = lance.dataset(self.uri, storage_options=self.storage_options)
            except ValueError as err:
                if "not found" not in str(err):
                    raise
        return self._dataset

    @property
    def dim(self) -> int | None:
        """D, the embedding size the index holds; None while it is empty."""
        ds = self._open()
        return ds.schema.field(COLUMN).type.list_size if ds is not None else None

    def __len__(self) -> int:
        ds = self._open()
        return ds.count_rows() if ds is not None else 0

    def has_index(self) -> bool:
        ds = self._open()
        return ds is not None and any(i.name == INDEX_NAME for i in ds.describe_indices())

    def add(self, table: pa.Table) -> int:
        """Insert the rows of `table` (clip_id, video_id, dataset_version, embedding as a list or fixed-size list of
        floats) whose clip_id is new; rows without an embedding are skipped. Returns the number of rows inserted.

        An existing clip_id keeps its row: a rerun of a version must not rewrite rows (an updated row leaves the
        indexed fragments), and a clip is compared against from the version that first added it."""
        rows = _usable_rows(table)
        if rows.num_rows == 0:
            return 0
        dim = self.dim
        if dim is None:
            dim = pc.list_value_length(rows[COLUMN])[0].as_py()
        rows = _fixed_size(rows, dim, self.uri)
        ds = self._open()
        if ds is None:
            self._dataset = lance.write_dataset(rows, self.uri, mode="create",
                                                storage_options=self.storage_options)
            return rows.num_rows
        result = ds.merge_insert(KEY).when_not_matched_insert_all().execute(rows)
        self._dataset = None  # reopened at the new version on next use
        return int(result["num_inserted_rows"])

    def build(self, num_partitions: int | None = None, num_sub_vectors: int | None = None, *,
              retrain: bool = False) -> str:
        """Make the IVF_PQ index (metric cosine) and say what was done:

        - "flat": fewer than MIN_INDEX_ROWS rows, no index (queries are brute force, exact);
        - "extended": an index exists and no setting was given: the rows added since go into a new delta segment
          with the index's centroids and codebooks (well under a second for a version's rows, where merging them
          into the index rewrites it: 75 s at 1M rows on 2 cores);
        - "merged": as "extended", but where that delta would make MAX_DELTAS segments, the segments and the new
          rows are rewritten as one instead, since each segment is searched on its own;
        - "trained": a new index, `num_partitions` (default sqrt(rows)) x `num_sub_vectors` (default D/16); pass
          `retrain=True` when the data has drifted from what the centroids were trained on."""
        rows = len(self)
        if rows < MIN_INDEX_ROWS:
            return "flat"
        ds = self._open()
        if self.has_index() and not retrain and num_partitions is None and num_sub_vectors is None:
            segments = next(len(i.segments) for i in ds.describe_indices() if i.name == INDEX_NAME)
            merge = segments + 1 >= MAX_DELTAS
            ds.optimize.optimize_indices(index_names=[INDEX_NAME], num_indices_to_merge=segments if merge else 0)
            self._dataset = None
            return "merged" if merge else "extended"
        dim = self.dim
        sub_vectors = num_sub_vectors or default_sub_vectors(dim)
        if dim % sub_vectors:
            raise ValueError(f"num_sub_vectors={sub_vectors} does not divide the embedding size {dim}; pick a divisor "
                             f"(default {default_sub_vectors(dim)})")
        ds.create_index(COLUMN, "IVF_PQ", name=INDEX_NAME, metric=METRIC, replace=True,
                        num_partitions=num_partitions or default_partitions(rows), num_sub_vectors=sub_vectors)
        self._dataset = None
        return "trained"

    def nearest(self, vectors: np.ndarray, k: int, max_version: int | None = None, *, nprobes: int | None = None,
                refine_factor: int = REFINE_FACTOR) -> list[list[tuple[str, float]]]:
        """For each query vector (a row of `vectors`, or one 1-D vector), its `k` nearest rows as (clip_id, cosine
        distance), nearest first, among the rows of dataset_version <= `max_version` when given (each query still
        gets k rows where there are k). `nprobes`: IVF partitions to scan (Lance's default when None);
        `refine_factor`: see REFINE_FACTOR."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.asarray(vectors, dtype=np.float32)
        queries = queries[None] if queries.ndim == 1 else queries
        ds = self._open()
        if ds is None or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        if queries.shape[1] != self.dim:
            raise ValueError(f"{self.uri} holds {self.dim}-d embeddings; the query vectors are {queries.shape[1]}-d")
        search = {"column": COLUMN, "k": k, "metric": METRIC}
        if self.has_index():
            search["refine_factor"] = refine_factor
            if nprobes is not None:
                search["nprobes"] = nprobes
        newer = 0 if max_version is None else ds.count_rows(f"dataset_version > {int(max_version)}")
        found: list[list[tuple[str, float]]] = []
        for start in range(0, len(queries), QUERY_BATCH):
            batch = queries[start:start + QUERY_BATCH]
            hits = _search_older(ds, batch, search, max_version, newer) if newer else _search(ds, batch, search, None)
            found.extend([(clip_id, distance) for clip_id, distance, _ in query_hits] for query_hits in hits)
        return found
