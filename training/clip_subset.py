"""A curriculum stage's subset of the curated clips, chosen by an expression over the clips table: a Lance SQL filter
in which `pNN(column)` stands for that column's NN-th percentile over the version's kept clips, e.g.
`aesthetic >= p90(aesthetic)` or `motion_mean >= p75(motion_mean) and text_area < 0.01`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import lance
import numpy as np
import pyarrow as pa

from training.config import ConfigError

# p90(aesthetic), p99.5( motion_p90 ): a percentile in [0, 100] of one column
PERCENTILE = re.compile(r"\bp(\d{1,3}(?:\.\d+)?)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)")
_LANCE_SOURCE = re.compile(r",\s*/\S+\.rs:\d+:\d+\s*$")  # Lance appends the Rust file and line to its errors


@dataclass(frozen=True)
class PercentileTerm:
    text: str  # as written, e.g. "p90(aesthetic)"
    q: float  # 90.0
    column: str  # "aesthetic"


def percentile_terms(expression: str) -> list[PercentileTerm]:
    """The `pNN(column)` terms of an expression, in order of appearance; a percentile above 100 is an error."""
    terms = []
    for match in PERCENTILE.finditer(expression):
        q = float(match[1])
        if q > 100:
            raise ConfigError(f"{match[0]}: a percentile is between p0 and p100")
        terms.append(PercentileTerm(match[0], q, match[2]))
    return terms


def substitute(expression: str, values: dict[str, float]) -> str:
    """`expression` with each `pNN(column)` term replaced by `values[term text]` (a float literal)."""
    return PERCENTILE.sub(lambda m: repr(float(values[m[0]])), expression)


def percentile(values: Sequence[float | None], q: float) -> float | None:
    """The q-th percentile (linear interpolation, numpy's default) of the values that are neither null nor NaN;
    None when there are none."""
    array = np.array([v for v in values if v is not None], dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(np.percentile(array, q)) if len(array) else None


@dataclass
class ResolvedSubset:
    expression: str  # as the config wrote it
    resolved: str  # with every percentile term replaced by its value over the version's kept clips
    percentiles: dict[str, float]  # term -> value
    clip_ids: list[str]  # the kept clips it selects, in the clips table's order
    population: int  # kept clips of the version


def resolve_subset(clips: lance.LanceDataset, expression: str, what: str) -> ResolvedSubset:
    """The kept clips of `clips` (the clips table at a dataset version) that `expression` selects. Percentile terms
    are computed over the kept clips, so `aesthetic >= p90(aesthetic)` is about the top tenth of what training would
    otherwise read; a clip whose column is null fails every comparison on it (SQL). `what` names the stage in the
    one-line errors."""
    if ";" in expression:
        raise ConfigError(f"{what}: where {expression!r} holds a ';': give one filter expression")
    if not expression.strip():
        raise ConfigError(f"{what}: where is empty")
    terms = percentile_terms(expression)
    values = {}
    for term in terms:
        values[term.text] = _percentile_of(clips, term, what)
    resolved = substitute(expression, values)
    try:
        selected = clips.to_table(columns=["clip_id"], filter=f"kept = true AND ({resolved})", scan_in_order=True)
        population = clips.count_rows(filter="kept = true")
    except (ValueError, OSError) as err:
        raise ConfigError(f"{what}: where {expression!r} is not a filter over the clips table: "
                          f"{_first_line(err)}") from None
    return ResolvedSubset(expression, resolved, values, selected["clip_id"].to_pylist(), population)


def _percentile_of(clips: lance.LanceDataset, term: PercentileTerm, what: str) -> float:
    field = clips.schema.field(term.column) if term.column in clips.schema.names else None
    if field is None or not _numeric(field.type):
        numeric = sorted(f.name for f in clips.schema if _numeric(f.type))
        problem = "is not a column" if field is None else f"is {field.type}, not a number"
        raise ConfigError(f"{what}: {term.text}: {term.column!r} {problem} of the clips table; numeric columns: "
                          f"{', '.join(numeric)}")
    column = clips.to_table(columns=[term.column], filter="kept = true")[term.column].to_pylist()
    value = percentile(column, term.q)
    if value is None:
        raise ConfigError(f"{what}: {term.text}: no kept clip has a {term.column} value (was its stage run?)")
    return value


def _numeric(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp) or pa.types.is_floating(tp)


def _first_line(err: Exception) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return _LANCE_SOURCE.sub("", text)[:400]


class ClipSubset:
    """The rows `rows` of a training.dataset.ClipTable, renumbered 0..len-1, with its read interface (metadata, take,
    shown, version): StageLoader reads a stage's subset through it with the same replayable order."""

    def __init__(self, table, rows: Sequence[int]):
        self.base, self.rows = table, [int(r) for r in rows]
        self.shards, self.data_uri, self.shown, self.number = table.shards, table.data_uri, table.shown, table.number
        self._metadata: dict[str, list] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def version(self) -> str:
        return self.base.version

    @property
    def lance_version(self) -> int:
        return self.base.lance_version

    def metadata(self) -> dict[str, list]:
        if self._metadata is None:
            full = self.base.metadata()
            self._metadata = {column: [values[r] for r in self.rows] for column, values in full.items()}
        return self._metadata

    def take(self, indices: Sequence[int], *args, **kwargs) -> list[dict]:
        outside = [i for i in indices if not 0 <= int(i) < len(self.rows)]
        if outside:
            raise IndexError(f"row {outside[0]} is out of range for a subset of {len(self.rows)} rows")
        return self.base.take([self.rows[int(i)] for i in indices], *args, **kwargs)
