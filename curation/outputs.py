"""Writers for the curation outputs: per-video staging records, the final tables and shards, the manifest.

A video's staging file is its completion record: it is written under a temporary name and renamed, so a run killed
at any point (even kill -9) leaves either a whole record or none. Finalizing streams the staging records in
`video_id` order into deterministically named files, so a resumed run produces the same tables as an uninterrupted
one, then writes `manifest.json` last and only then removes the staging records.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import schema
from curation.discover import filesystem_and_path

STAGING = "_staging"
MANIFEST = "manifest.json"


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_and_path(uri)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as out:
            out.write(data)
        self.fs.move(tmp, final)

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def list(self, rel: str, suffix: str) -> list[str]:
        if not self.exists(rel):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel)))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))

    def delete(self, rel: str) -> None:
        self.fs.delete_file(self.path(rel))


class StagingWriter:
    """Ray Data stage: writes each video's staged table atomically and returns a one-line summary per video."""

    def __init__(self, output_uri: str):
        self.output_uri = output_uri

    def setup(self) -> None:
        self.out = OutputDir(self.output_uri)
        self.out.makedirs(STAGING)

    def __call__(self, batch: pa.Table) -> dict:
        summary = {"video_id": [], "status": [], "error_class": [], "clips": [], "kept": [], "seconds": []}
        for i in range(batch.num_rows):
            row = batch.slice(i, 1)
            video_id = row["video_id"][0].as_py()
            sink = pa.BufferOutputStream()
            pq.write_table(row.cast(schema.STAGED), sink, compression="zstd")
            self.out.write_bytes_atomic(posixpath.join(STAGING, f"{video_id}.parquet"), sink.getvalue().to_pybytes())
            clips = row["clips"][0].as_py() or []
            summary["video_id"].append(video_id)
            summary["status"].append(row["status"][0].as_py())
            summary["error_class"].append(row["error_class"][0].as_py())
            summary["clips"].append(len(clips))
            summary["kept"].append(sum(bool(c["kept"]) for c in clips))
            summary["seconds"].append(row["duration_s"][0].as_py() or 0.0)
        return summary


class _RollingWriter:
    """Writes rows into `<dir>/<prefix>-00000.parquet`, `-00001`, ... with at most `rows_per_file` rows each."""

    def __init__(self, out: OutputDir, directory: str, prefix: str, table_schema: pa.Schema, rows_per_file: int):
        self.out, self.directory, self.prefix = out, directory, prefix
        self.schema, self.rows_per_file = table_schema, max(1, rows_per_file)
        self.buffer: list[dict] = []
        self.files: list[dict] = []
        out.makedirs(directory)

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        rel = posixpath.join(self.directory, f"{self.prefix}-{len(self.files):05d}.parquet")
        self.out.write_bytes_atomic(rel, data)
        self.files.append({"path": rel, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
        self.buffer = []


def read_manifest(out: OutputDir) -> dict | None:
    if not out.exists(MANIFEST):
        return None
    return json.loads(out.read_text(MANIFEST))


def finalize(out: OutputDir, config_dict: dict, config_yaml: str, version: int, previous: dict | None,
             duplicates: dict[str, str], table_rows: int, shard_rows: int) -> dict:
    """Turn the staging records into this version's tables and shards, then write the manifest."""
    prefix = f"v{version:04d}"
    videos = _RollingWriter(out, "videos", prefix, schema.VIDEOS, table_rows)
    clips = _RollingWriter(out, "clips", prefix, schema.CLIPS, table_rows)
    shards = _RollingWriter(out, "shards", prefix, schema.SHARDS, shard_rows)
    counts = {"videos": 0, "videos_ok": 0, "quarantined": {}, "clips": 0, "clips_kept": 0, "drop_reasons": {},
              "video_seconds": 0.0}
    staged = out.list(STAGING, ".parquet")
    for name in staged:
        with out.fs.open_input_file(out.path(STAGING, name)) as f:
            row = pq.read_table(f).to_pylist()[0]
        video_clips = row.pop("clips") or []
        videos.add({k: row[k] for k in schema.VIDEOS.names})
        counts["videos"] += 1
        if row["status"] == "ok":
            counts["videos_ok"] += 1
            counts["video_seconds"] += row["duration_s"] or 0.0
        else:
            counts["quarantined"][row["error_class"]] = counts["quarantined"].get(row["error_class"], 0) + 1
        for clip in video_clips:
            counts["clips"] += 1
            clips.add({k: clip[k] for k in schema.CLIPS.names})
            if clip["kept"]:
                counts["clips_kept"] += 1
                shard_row = {k: clip[k] for k in schema.CLIPS.names}
                shard_row.update(uri=row["uri"], fps=row["fps"], width=clip["width"], height=clip["height"],
                                 video_bytes=clip["video_bytes"])
                shards.add(shard_row)
            else:
                reason = (clip["drop_reason"] or "").split("(")[0]
                counts["drop_reasons"][reason] = counts["drop_reasons"].get(reason, 0) + 1
    for writer in (videos, clips, shards):
        writer.flush()
    config_rel = f"config-{prefix}.yaml"
    out.write_bytes_atomic(config_rel, config_yaml.encode())
    versions = list(previous["versions"]) if previous else []
    versions.append({"version": version, "config": config_rel, "counts": counts,
                     "files": {"videos": videos.files, "clips": clips.files, "shards": shards.files}})
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset_version": version,
        "config": config_dict,
        "counts": counts,
        "duplicates": {**(previous or {}).get("duplicates", {}), **duplicates},
        "versions": versions,
        "files": [f for v in versions for kind in ("videos", "clips", "shards") for f in v["files"][kind]],
    }
    out.write_bytes_atomic(MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode())
    for name in staged:
        out.delete(posixpath.join(STAGING, name))
    return manifest
