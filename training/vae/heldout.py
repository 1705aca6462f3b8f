"""The held-out split of a curated dataset: a fixed set of clips the autoencoder never trains on and is scored on.
Clips are chosen by the sha256 of their clip_id, so the choice does not depend on row order, and a dataset that
grows keeps most of its held-out clips."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from training.dataset import ClipTable


def heldout_rows(clip_ids: Sequence[str], count: int) -> list[int]:
    """The rows of the `count` clips with the smallest sha256(clip_id), in row order."""
    keys = sorted(range(len(clip_ids)), key=lambda r: hashlib.sha256(str(clip_ids[r]).encode()).hexdigest())
    return sorted(keys[:count])


class RowSubset:
    """A ClipTable's rows less some: what the training loader reads (metadata and take by row index), with the
    rows renumbered 0..n-1 in the table's order. Version and URI are the table's (the held-out count is in the
    config, which the resume check covers)."""

    def __init__(self, table: ClipTable, rows: Sequence[int]):
        self.table = table
        self.rows = list(rows)
        self.shown, self.data_uri, self.version = table.shown, table.data_uri, table.version
        self._metadata: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def metadata(self) -> dict[str, list]:
        if self._metadata is None:
            full = self.table.metadata()
            self._metadata = {k: [values[r] for r in self.rows] for k, values in full.items()}
        return self._metadata

    def take(self, indices: Sequence[int]) -> list[dict]:
        return self.table.take([self.rows[int(i)] for i in indices])


def split(table: ClipTable, count: int) -> tuple[RowSubset, list[int]]:
    """(the training rows, the held-out rows) of `table` with `count` clips held out."""
    if count >= len(table):
        raise ValueError(f"eval.heldout_clips is {count} but {table.shown} has {len(table)} clips: nothing would be "
                         "left to train on; lower eval.heldout_clips or curate more videos")
    held = heldout_rows(table.metadata()["clip_id"], count)
    kept = sorted(set(range(len(table))) - set(held))
    return RowSubset(table, kept), held
