"""Writers and readers for the curation outputs: per-video staging records, versioned tables and shards, the manifest.

A video's staging file is its completion record: it is written under a temporary name and renamed, so a run killed
at any point (even kill -9) leaves either a whole record or none. Finalizing a dataset version takes two passes over
the staging records: the first reads only their scores and resolves the filters over the whole run (percentiles need
every clip), the second streams them in `video_id` order into deterministically named new files, so a resumed run
produces the same tables as an uninterrupted one. `manifest.json` is written last and only then are the staging
records removed: nothing written by an earlier version is ever rewritten.

Versions and superseded rows: every version's files stay listed in the manifest. A video appears in a later version
only when it was quarantined before and retried (`--retry-quarantined`); its newest row wins (`read_table` with
`latest_only`). A quarantined video has no clips and no shards, so the shards of all versions together hold each
kept clip exactly once.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import schema
from curation.config import CurateConfig
from curation.discover import filesystem_and_path
from curation.filters import SCORES, ClipFilter, apply_late_filters, clip_scores, reason_filters
from curation.redact import redact_uri

STAGING = "_staging"
MANIFEST = "manifest.json"
REPORTS = "reports"
KINDS = ("videos", "clips", "shards")


class OutputDir:
    def __init__(self, uri: str):
        self.uri = uri
        self.fs, self.root = filesystem_and_path(uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

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

    def read_parquet(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.read_table(f, columns=columns)

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
            # The record (and the tables and shards made from it) shows URIs as logs do: credentials masked, in the
            # uri itself and in any message that quotes one (a sidecar's or a store's error).
            for column in ("uri", "error_message"):
                shown = pa.array([redact_uri(row[column][0].as_py())], pa.string())
                row = row.set_column(row.schema.get_field_index(column), column, shown)
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


def latest_status(out: OutputDir, manifest: dict | None) -> dict[str, str]:
    """video_id -> status ("ok" | "quarantined") of its newest row over every version."""
    status: dict[str, str] = {}
    for version in (manifest or {}).get("versions", []):
        for f in version["files"]["videos"]:
            table = out.read_parquet(f["path"], columns=["video_id", "status"])
            status.update(zip(table["video_id"].to_pylist(), table["status"].to_pylist(), strict=True))
    return status


def version_video_ids(out: OutputDir, version: dict) -> set[str]:
    ids: set[str] = set()
    for f in version["files"]["videos"]:
        ids.update(out.read_parquet(f["path"], columns=["video_id"])["video_id"].to_pylist())
    return ids


# The staged columns the first pass needs: no keyframes, no encoded bytes.
_VIDEO_COLUMNS = ("video_id", "status", "width", "height")
_CLIP_COLUMNS = ("clip_id", "start_s", "end_s", "motion_mean", "motion_median", "drop_reason", "aesthetic",
                 "caption_match", "score_model")


def _read_staged_scores(out: OutputDir, name: str) -> dict:
    with out.fs.open_input_file(out.path(STAGING, name)) as f:
        parquet = pq.ParquetFile(f)
        paths = [parquet.schema.column(i).path for i in range(parquet.metadata.num_columns)]
        wanted = [p for p in paths if (p in _VIDEO_COLUMNS)
                  or (p.startswith("clips.") and p.rsplit(".", 1)[-1] in _CLIP_COLUMNS)]
        return parquet.read(columns=wanted).to_pylist()[0]


def _sample_key(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode()).hexdigest()


def _pick_samples(clips: list[dict], count: int) -> tuple[list[str], list[str]]:
    """Deterministic sample clip ids: kept ones by hash, dropped ones round-robin over their first failed filter so
    every drop reason shows up on the contact sheet."""
    kept = sorted((c["clip_id"] for c in clips if c["drop_reason"] is None), key=_sample_key)[:count]
    groups: dict[str, list[str]] = {}
    for c in clips:
        if c["drop_reason"] is not None:
            groups.setdefault(reason_filters(c["drop_reason"])[0], []).append(c["clip_id"])
    queues = [sorted(ids, key=_sample_key) for _, ids in sorted(groups.items())]
    dropped: list[str] = []
    while len(dropped) < count and any(queues):
        for queue in queues:
            if queue and len(dropped) < count:
                dropped.append(queue.pop(0))
    return kept, dropped


@dataclass
class VersionWrite:
    """One dataset version's new files (not yet in the manifest) and what the report needs about its clips."""

    version: int
    config_path: str
    files: dict[str, list[dict]]
    counts: dict
    bounds: list[dict]  # every filter threshold: score, side, value, percentile, applied
    untrained: bool
    warnings: list[str]
    superseded: list[str]  # video_ids whose earlier (quarantined) rows this version replaces
    staged: list[str]  # staging record names consumed
    scores: list[dict] = field(default_factory=list)  # per clip: ids, score values, kept, drop_reason
    samples: list[dict] = field(default_factory=list)  # sample clips with their middle keyframe, for the report


def write_version(out: OutputDir, config: CurateConfig, config_yaml: str, version: int,
                  known: dict[str, str]) -> VersionWrite:
    """Apply the run's filters to every staged clip and write this version's tables, shards and config file.

    `known`: video_id -> latest status in earlier versions; a staged video found there supersedes its old row."""
    prefix = f"v{version:04d}"
    staged = out.list(STAGING, ".parquet")
    motion_stat = config.filters.motion_stat
    # Pass 1: scores only, to resolve percentiles over every clip of the run.
    clips: list[dict] = []
    untrained = False
    superseded = []
    for name in staged:
        row = _read_staged_scores(out, name)
        if row["video_id"] in known:
            if known[row["video_id"]] != "quarantined":  # a video with clips must never get a second set of shards
                raise RuntimeError(f"staged video {row['video_id']} was already finalized with status "
                                   f"{known[row['video_id']]}; delete {STAGING}/{name} and rerun")
            superseded.append(row["video_id"])
        width, height = row.get("width"), row.get("height")
        short_side = min(width, height) if width and height else None
        for clip in row.get("clips") or []:
            untrained = untrained or "untrained" in (clip.get("score_model") or "")
            clips.append({"clip_id": clip["clip_id"], "video_id": row["video_id"],
                          "staged_reason": clip["drop_reason"], **clip_scores(clip, short_side, motion_stat)})
    outcome = apply_late_filters(config.filters, [{k: c[k] for k in SCORES} for c in clips],
                                 [c["staged_reason"] for c in clips], untrained)
    final: dict[str, str | None] = {}
    for clip, reason in zip(clips, outcome.reasons, strict=True):
        clip["drop_reason"] = reason
        clip["kept"] = reason is None
        final[clip["clip_id"]] = reason
        del clip["staged_reason"]
    sample_kept, sample_dropped = _pick_samples(clips, config.report.samples)
    wanted_samples = set(sample_kept) | set(sample_dropped)
    by_id = {c["clip_id"]: c for c in clips}

    # Pass 2: the tables and shards, each clip with its final verdict.
    out_files = config.output_files
    videos = _RollingWriter(out, "videos", prefix, schema.VIDEOS, out_files.table_rows)
    clip_writer = _RollingWriter(out, "clips", prefix, schema.CLIPS, out_files.table_rows)
    shards = _RollingWriter(out, "shards", prefix, schema.SHARDS, out_files.shard_rows)
    counts = {"videos": 0, "videos_ok": 0, "quarantined": {}, "clips": 0, "clips_kept": 0, "clips_dropped": 0,
              "drop_reasons": {}, "video_seconds": 0.0, "superseded": len(superseded)}
    samples: dict[str, dict] = {}
    for name in staged:
        row = out.read_parquet(posixpath.join(STAGING, name)).to_pylist()[0]
        video_clips = row.pop("clips") or []
        videos.add({k: row.get(k) for k in schema.VIDEOS.names})
        counts["videos"] += 1
        if row["status"] == "ok":
            counts["videos_ok"] += 1
            counts["video_seconds"] += row["duration_s"] or 0.0
        else:
            counts["quarantined"][row["error_class"]] = counts["quarantined"].get(row["error_class"], 0) + 1
        for clip in video_clips:
            reason = final[clip["clip_id"]]
            clip.update(kept=reason is None, drop_reason=reason)
            counts["clips"] += 1
            clip_row = {k: clip.get(k) for k in schema.CLIPS.names}
            clip_writer.add(clip_row)
            if reason is None:
                counts["clips_kept"] += 1
                shard_row = dict(clip_row)
                shard_row.update(uri=row["uri"], fps=row["fps"], width=clip["width"], height=clip["height"],
                                 video_bytes=clip["video_bytes"])
                shards.add(shard_row)
            else:
                counts["clips_dropped"] += 1
                for failed in reason_filters(reason):  # a clip failing several filters counts under each
                    counts["drop_reasons"][failed] = counts["drop_reasons"].get(failed, 0) + 1
            if clip["clip_id"] in wanted_samples:
                keyframes = clip.get("keyframes") or []
                samples[clip["clip_id"]] = {**by_id[clip["clip_id"]], "caption": clip.get("caption"),
                                            "keyframe": keyframes[len(keyframes) // 2] if keyframes else None}
    for writer in (videos, clip_writer, shards):
        writer.flush()
    config_rel = f"config-{prefix}.yaml"
    out.write_bytes_atomic(config_rel, config_yaml.encode())
    bounds = ClipFilter(config.filters).early_bounds() + outcome.bounds
    return VersionWrite(
        version=version, config_path=config_rel,
        files={"videos": videos.files, "clips": clip_writer.files, "shards": shards.files},
        counts=counts,
        bounds=[{"score": b.score, "side": b.side, "value": b.value, "percentile": b.percentile,
                 "applied": b.applied, "label": b.label} for b in bounds],
        untrained=untrained, warnings=outcome.warnings, superseded=sorted(superseded), staged=staged,
        scores=clips, samples=[samples[i] for i in sample_kept + sample_dropped if i in samples],
    )


def commit_version(out: OutputDir, written: VersionWrite, config_dict: dict, previous: dict | None,
                   duplicates: dict[str, str], run: dict | None = None, report: list[str] | None = None) -> dict:
    """Write the manifest that makes `written` dataset version N (listing every file of every version), then remove
    the staging records it consumed. `run`: the MLflow run and timings; `report`: report files under the output."""
    versions = list(previous["versions"]) if previous else []
    versions.append({
        "version": written.version,
        "config": written.config_path,
        "counts": written.counts,
        "files": written.files,
        "filters": written.bounds,
        "scores_untrained": written.untrained,
        "warnings": written.warnings,
        "superseded": written.superseded,
        "run": run or {},
        "report": report or [],
    })
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset_version": written.version,
        "config": config_dict,
        "counts": written.counts,
        "run": run or {},
        "duplicates": {**(previous or {}).get("duplicates", {}),
                       **{redact_uri(uri): video_id for uri, video_id in duplicates.items()}},
        # Readers: per video_id, take the row of the newest version listing it (see read_table); shards of every
        # version can be read as they are, since superseded videos were quarantined and have none.
        "versions": versions,
        "files": [f for v in versions for kind in KINDS for f in v["files"][kind]],
    }
    out.write_bytes_atomic(MANIFEST, json.dumps(manifest, indent=2, sort_keys=False).encode())
    for name in written.staged:
        out.delete(posixpath.join(STAGING, name))
    return manifest


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


def read_clips(output: str | OutputDir, latest_only: bool = True, kept_only: bool = False,
               columns: list[str] | None = None) -> pa.Table:
    """The clips table across versions; kept_only: the clips that are in the shards."""
    read_columns = None if columns is None else list(dict.fromkeys([*columns, "kept"]))
    table = read_table(output, "clips", latest_only=latest_only, columns=read_columns)
    if kept_only:
        table = table.filter(pc.equal(table["kept"], True))
    return table.select(columns) if columns is not None else table


def shard_paths(output: str | OutputDir) -> list[str]:
    """Every shard file of every version, relative to the output: together they hold each kept clip once."""
    out = output if isinstance(output, OutputDir) else OutputDir(output)
    manifest = read_manifest(out) or {"versions": []}
    return [f["path"] for entry in manifest["versions"] for f in entry["files"]["shards"]]
