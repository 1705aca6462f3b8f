"""The Parquet layout of reelforge 0.1 (`manifest.json` listing every file of every version), read only to migrate
it into Lance datasets (`reelforge migrate-dataset`)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.outputs import OutputDir
from curation.redact import redact_uri

MANIFEST = "manifest.json"
KINDS = ("videos", "clips", "shards")


def read_manifest(out: OutputDir) -> dict | None:
    if not out.exists(MANIFEST):
        return None
    return json.loads(out.read_text(MANIFEST))


def version_video_ids(out: OutputDir, version: dict) -> set[str]:
    ids: set[str] = set()
    for f in version["files"]["videos"]:
        ids.update(out.read_parquet(f["path"], columns=["video_id"])["video_id"].to_pylist())
    return ids


def read_table(output: str | OutputDir, kind: str, latest_only: bool = True,
               columns: list[str] | None = None) -> pa.Table:
    """One of `videos`, `clips`, `shards` across every dataset version in the manifest.

    latest_only: keep, for each video_id, only the rows of the newest version that lists the video (a quarantined
    video retried later is superseded by its new row). Columns a version's files lack (older schema) are null."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{redact_uri(out.uri)} has no {MANIFEST}: run `reelforge curate` into it first")
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "video_id"]))
    newest: dict[str, int] = {}
    if latest_only:
        for entry in manifest["versions"]:
            newest.update(dict.fromkeys(version_video_ids(out, entry), entry["version"]))
    tables = []
    for entry in manifest["versions"]:
        ids = pa.array([v for v, n in newest.items() if n == entry["version"]], pa.string())
        for f in entry["files"][kind]:
            table = out.read_parquet(f["path"], columns=read_columns)
            if latest_only:
                table = table.filter(pc.is_in(table["video_id"], value_set=ids))
            tables.append(table)
    if not tables:
        names = columns or getattr(schema, kind.upper()).names
        return getattr(schema, kind.upper()).empty_table().select(names)
    table = pa.concat_tables(tables, promote_options="default")
    return table.select(columns) if columns is not None else table
