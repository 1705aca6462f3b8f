"""The Parquet layout of reelforge 0.1 (`manifest.json` listing every file of every version), read only to migrate
it into Lance datasets (`reelforge migrate-dataset`): its tables per version, and each version's record."""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from curation import schema
from curation.dataset import SCHEMAS, CuratedDataset, sql_list
from curation.outputs import OutputDir
from curation.redact import redact_uri, redacted_yaml
from curation.writer import tag_version

MANIFEST = "manifest.json"
STAGING = "_staging"  # staged records of a 0.1 run that stopped before its manifest: in no version
KINDS = ("videos", "clips", "shards")
MIGRATED_FROM = "parquet manifest"  # the record's `migrated_from` of a version made by `reelforge migrate-dataset`
_BATCH_ROWS = 256  # rows read at a time from a 0.1 file (a shard row holds a whole encoded clip)


class LegacyLayoutError(ValueError):
    """An output that is not a readable 0.1 layout: its message is one line, for the user."""


def read_manifest(out: OutputDir) -> dict | None:
    if not out.exists(MANIFEST):
        return None
    return json.loads(out.read_text(MANIFEST))


def checked_manifest(out: OutputDir) -> dict:
    """The manifest of a 0.1 layout whose every listed file is present, or a one-line error saying what is wrong."""
    shown = redact_uri(out.uri)
    try:
        manifest = read_manifest(out)
    except (ValueError, UnicodeDecodeError) as err:
        raise LegacyLayoutError(f"{shown}/{MANIFEST} is not readable JSON ({err}): it is not a reelforge 0.1 "
                                "manifest") from None
    if manifest is None:
        raise LegacyLayoutError(f"{shown} has no {MANIFEST}: it is not in the Parquet layout of reelforge 0.1, "
                                "so there is nothing to migrate")
    versions = manifest.get("versions") if isinstance(manifest, dict) else None
    if not isinstance(versions, list) or not all(isinstance(v, dict) and "version" in v and "files" in v
                                                 for v in versions):
        raise LegacyLayoutError(f"{shown}/{MANIFEST} has no versions[] with version and files: it is not a "
                                "reelforge 0.1 manifest")
    numbers = [v["version"] for v in versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise LegacyLayoutError(f"{shown}/{MANIFEST} lists versions {numbers}, not 1, 2, ... in order: it was "
                                "edited by hand; restore it before migrating")
    for entry in versions:
        for kind in KINDS:
            for f in entry["files"].get(kind, []):
                if not out.exists(f["path"]):
                    raise LegacyLayoutError(f"{shown}: {f['path']} listed in {MANIFEST} (version {entry['version']})"
                                            " is missing: restore it before migrating")
    return manifest


def version_video_ids(out: OutputDir, version: dict) -> set[str]:
    ids: set[str] = set()
    for f in version["files"]["videos"]:
        ids.update(out.read_parquet(f["path"], columns=["video_id"])["video_id"].to_pylist())
    return ids


def read_table(output: str | OutputDir, kind: str, latest_only: bool = True,
               columns: list[str] | None = None, up_to: int | None = None) -> pa.Table:
    """One of `videos`, `clips`, `shards` across every dataset version in the manifest (or those up to `up_to`:
    what the layout showed when that version was the newest).

    latest_only: keep, for each video_id, only the rows of the newest version that lists the video (a quarantined
    video retried later is superseded by its new row). Columns a version's files lack (older schema) are null."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    manifest = read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{redact_uri(out.uri)} has no {MANIFEST}: run `reelforge curate` into it first")
    entries = [e for e in manifest["versions"] if up_to is None or e["version"] <= up_to]
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "video_id"]))
    newest: dict[str, int] = {}
    if latest_only:
        for entry in entries:
            newest.update(dict.fromkeys(version_video_ids(out, entry), entry["version"]))
    tables = []
    for entry in entries:
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


def conform(batch: pa.RecordBatch, kind: str, version: int) -> pa.RecordBatch:
    """A batch of a 0.1 file in today's schema of `kind`: columns an older schema lacked are null, columns since
    removed are left out, and `dataset_version` is the version whose files hold the row."""
    target = SCHEMAS[kind]
    columns = []
    for field in target:
        if field.name == "dataset_version":
            columns.append(pa.array([version] * batch.num_rows, field.type))
        elif field.name in batch.schema.names:
            columns.append(batch.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(batch.num_rows, field.type))
    return pa.RecordBatch.from_arrays(columns, schema=target)


def version_batches(out: OutputDir, entry: dict, kind: str) -> Iterator[pa.RecordBatch]:
    """Every row of one version's `kind` files, conformed, a few hundred rows at a time (shard rows are large)."""
    for f in entry["files"].get(kind, []):
        with out.fs.open_input_file(out.path(f["path"])) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=_BATCH_ROWS):
                yield conform(batch, kind, entry["version"])


def _version_config(out: OutputDir, entry: dict, fallback: dict | None) -> tuple[dict, str | None]:
    """The resolved config of a version and its hash, from its config-v000N.yaml (written redacted by 0.1); the
    manifest's own `config` (the newest version's) when that file is gone."""
    path = entry.get("config")
    if isinstance(path, str) and out.exists(path):
        text = out.read_text(path)
        return yaml.safe_load(text) or {}, hashlib.sha256(text.encode()).hexdigest()
    if fallback:
        return fallback, hashlib.sha256(redacted_yaml(fallback).encode()).hexdigest()
    return {}, None


def version_record(out: OutputDir, manifest: dict, entry: dict) -> dict:
    """A 0.1 manifest entry as the record `reelforge curate` keeps in a version's tags. The 0.1 manifest kept one
    list of duplicate files for all versions, so only the newest version's record has `duplicates`."""
    newest = entry["version"] == manifest["versions"][-1]["version"]
    config, config_sha256 = _version_config(out, entry, manifest.get("config") if newest else None)
    record = {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset_version": entry["version"],
        "config": config,
        "config_sha256": config_sha256,
        "config_file": entry.get("config"),
        "counts": entry.get("counts", {}),
        "filters": entry.get("filters", []),
        "scores_untrained": entry.get("scores_untrained", False),
        "warnings": entry.get("warnings", []),
        "retried": entry.get("superseded", []),
        "run": entry.get("run", {}),
        "report": entry.get("report", []),
        "migrated_from": MIGRATED_FROM,
        "legacy_schema_version": manifest.get("schema_version"),
        "legacy_files": entry["files"],
    }
    if newest:
        record["duplicates"] = manifest.get("duplicates", {})
    return record


def _delete(dataset: CuratedDataset, kind: str, where: str) -> None:
    table = dataset.open(kind)
    if table.count_rows(where):
        table.delete(where)


def _append(dataset: CuratedDataset, kind: str, batches: Iterator[pa.RecordBatch]) -> None:
    """One commit of every batch, streamed (a version's shards need not fit in memory); none when there are none."""
    first = next(batches, None)
    if first is None:
        return
    reader = pa.RecordBatchReader.from_batches(SCHEMAS[kind], itertools.chain([first], batches))
    lance.write_dataset(reader, dataset.table_uri(kind), schema=SCHEMAS[kind], mode="append",
                        storage_options=dataset.storage_options or None)


def migrate_version(dataset: CuratedDataset, out: OutputDir, manifest: dict, entry: dict) -> dict:
    """Make 0.1 version `entry` the Lance-tagged dataset version of the same number: its rows added, the rows of
    earlier versions that its videos supersede removed (newest row wins, as read_table reads), then tagged with its
    record. Versions are migrated in order; repeating one whose tag is missing (a run killed part-way) first removes
    what the interrupted attempt had added, so no row is added twice."""
    version = entry["version"]
    for kind in KINDS:
        _delete(dataset, kind, f"dataset_version = {version}")
    earlier = dataset.open("videos").to_table(columns=["video_id"], filter=f"dataset_version < {version}")
    superseded = sorted(version_video_ids(out, entry) & set(earlier["video_id"].to_pylist()))
    if superseded:
        quoted = sql_list(superseded)
        for kind in KINDS:
            _delete(dataset, kind, f"dataset_version < {version} AND video_id IN ({quoted})")
    for kind in ("shards", "clips", "videos"):
        _append(dataset, kind, version_batches(out, entry, kind))
    return tag_version(dataset, version, version_record(out, manifest, entry))
