"""The read side of a curated dataset for training: the kept clips of one dataset version (`ClipTable`), and how a
version is named (`pin_version`) and fingerprinted (`content_id`).

Without torch, so the curate driver can record the version it made as an MLflow dataset without importing the
training stack (training/dataset.py samples and decodes from it)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import lance

from curation.dataset import DatasetError, open_data, split_version
from curation.redact import redact_uri

SHARD_COLUMNS = ["clip_id", "caption", "fps", "num_frames", "video_bytes"]  # what a training row reads
METADATA_COLUMNS = ["clip_id", "num_frames", "fps", "caption", "width", "height"]  # width, height: for buckets


def pin_version(data: str, number: int) -> str:
    """`data` naming dataset version `number` (the inverse of curation.dataset.split_version): DIR -> DIR@v3,
    s3://b/dir?endpoint_override=... -> s3://b/dir@v3?endpoint_override=..., DIR@v2 -> DIR@v3."""
    base, _ = split_version(data)
    if "://" not in base:
        return f"{base}@v{number}"
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path=f"{parts.path or '/'}@v{number}"))


def content_id(shards: lance.LanceDataset) -> str:
    """A hash of the data and deletion files of a Lance version: Lance names every file it writes with a fresh
    random id, so two versions (or two datasets) share it only when they hold the same rows, and a copy of the
    dataset elsewhere keeps it."""
    files = [[f.fragment_id, [d.path for d in f.data_files()], f.deletion_file(), f.physical_rows]
             for f in shards.get_fragments()]
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]


class ClipTable:
    """The read side of a curated dataset: the kept clips of one dataset version, random access by row index.

    The table is the `shards` Lance dataset at the version's tag. Rows are numbered in its order at that version
    (fragments in order, each fragment's rows in order, deleted rows left out): a tagged version is immutable, so
    scans and `take` agree on that order on every worker and in every later read of `DIR@vN`. One LanceDataset
    serves every decode thread: at a fixed version it holds no mutable state and its `take` may be called from
    several threads at once."""

    def __init__(self, shards: lance.LanceDataset, data_uri: str, number: int):
        self.shards = shards
        self.data_uri = data_uri  # DIR@vN: the same rows wherever it is opened (workers, a later reproduction)
        self.shown = redact_uri(data_uri)
        self.number = number
        self._rows = shards.count_rows()
        self._version = f"v{number}-lance{shards.version}-{content_id(shards)}"
        self._metadata: dict[str, list] | None = None

    @classmethod
    def open(cls, data: str) -> ClipTable:
        """The kept clips of the curated dataset `data` (a path or URI, `@vN` for version N, else the newest)."""
        dataset, number = open_data(data)  # the one-line errors: no dataset, Parquet layout, unknown version
        table = cls(dataset.open("shards", number), pin_version(data, number), number)
        if not len(table):
            raise DatasetError(f"{table.shown}: dataset version {number} has no kept clips, so there is nothing to "
                               "read; curate more videos or relax the filters")
        return table

    def __len__(self) -> int:
        return self._rows

    @property
    def version(self) -> str:
        """Which rows, exactly: `v<dataset version>-lance<Lance version of shards>-<content_id>`."""
        return self._version

    @property
    def lance_version(self) -> int:
        return self.shards.version

    def metadata(self) -> dict[str, list]:
        """clip_id, num_frames, fps, caption, width and height of every row, in row order (no video bytes are
        read)."""
        if self._metadata is None:
            table = self.shards.to_table(columns=METADATA_COLUMNS, scan_in_order=True)
            self._metadata = {c: table[c].to_pylist() for c in METADATA_COLUMNS}
        return self._metadata

    def take(self, indices: Sequence[int]) -> list[dict]:
        """Full rows (SHARD_COLUMNS, video bytes included) in the order of `indices`; thread-safe."""
        indices = [int(i) for i in indices]
        outside = [i for i in indices if not 0 <= i < self._rows]
        if outside:
            raise IndexError(f"row {outside[0]} is out of range for a table of {self._rows} rows")
        if not indices:
            return []
        return self.shards.take(indices, columns=SHARD_COLUMNS).to_pylist()
