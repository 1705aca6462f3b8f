"""`reelforge export-dataset`: the kept clips of one curated dataset version (its `shards` table) as plain files for
other trainers: Parquet files, or WebDataset tar shards (`KEY.mp4`, `KEY.txt`, `KEY.json` per clip).

Clips go out in clip_id order, so the same version always gives the same files, byte for byte (tar members carry a
fixed mtime and owner). `_export.json`, written last, names the source, the version and every file with its rows
and sha256: a folder without it holds an interrupted export."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import tarfile
import time
import uuid
from dataclasses import dataclass

import lance
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from curation import schema
from curation.dataset import open_data
from curation.outputs import OutputDir
from curation.redact import redact_uri

log = logging.getLogger("reelforge.export")

FORMATS = ("parquet", "webdataset")
MANIFEST = "_export.json"
_READ_ROWS = 64  # clips read from the dataset at a time: an export's memory is this many encoded clips
_LOG_EVERY_S = 30.0
# Every shard column but the verdict, which is the same for all kept clips.
PARQUET_COLUMNS = [f.name for f in schema.SHARDS if f.name not in ("kept", "drop_reason")]
_SCORES = ("aesthetic", "caption_match", "motion_mean", "motion_median", "motion_p90", "is_static", "score_model")
_META = ("clip_id", "video_id", "uri", "start_frame", "end_frame", "start_s", "end_s", "fps", "num_frames", "width",
         "height", "caption_source", "dataset_version")
TAR_COLUMNS = [*_META, *_SCORES, "caption", "video_bytes"]
_OWN_FILE = re.compile(r"(part-\d{6}\.parquet|shard-\d{6}\.tar|_export\.json)(\.tmp-[0-9a-f]{8})?")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


class ExportError(ValueError):
    """An export that cannot be made as asked: its message is one line, for the user."""


@dataclass
class ExportConfig:
    data: str  # DIR or DIR@vN
    format: str  # "parquet" | "webdataset"
    output: str  # a folder, local or a URI
    rows_per_file: int = 1000  # clips per Parquet file or tar shard
    overwrite: bool = False  # replace a previous export in `output`


def sample_key(clip_id: str) -> str:
    """A WebDataset key for a clip: letters, digits, `_` and `-` only (a `.` would split the key from the
    extension, a `/` make a folder); an id that had to change gets a hash of itself so keys stay distinct."""
    safe = _UNSAFE_KEY.sub("_", clip_id)
    if safe != clip_id or not safe:
        safe = f"{safe}-{hashlib.sha1(clip_id.encode()).hexdigest()[:10]}"
    return safe


def _json_value(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def sample_metadata(row: dict) -> dict:
    """The `.json` of one WebDataset sample."""
    meta = {key: _json_value(row[key]) for key in _META}
    meta["scores"] = {key: _json_value(row[key]) for key in _SCORES}
    return meta


class _HashingStream:
    """A writable file that hashes and counts what passes through to `stream`, so the sha256 of a file written to
    an object store needs no second read."""

    def __init__(self, stream):
        self.stream, self.sha256, self.size, self.closed = stream, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        self.stream.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class _ExportFile:
    """One export file: written to a temporary name through a hashing stream, renamed when complete."""

    def __init__(self, out: OutputDir, name: str):
        self.out, self.name, self.rows = out, name, 0
        self.tmp = f"{name}.tmp-{uuid.uuid4().hex[:8]}"
        self.stream = out.fs.open_output_stream(out.path(self.tmp))
        self.hashing = _HashingStream(self.stream)

    def write(self, table: pa.Table) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def close(self) -> dict:
        self._finish()
        self.stream.close()
        self.out.fs.move(self.out.path(self.tmp), self.out.path(self.name))
        return {"path": self.name, "rows": self.rows, "bytes": self.hashing.size,
                "sha256": self.hashing.sha256.hexdigest()}


class ParquetPart(_ExportFile):
    """`part-NNNNNN.parquet`: the shard columns, zstd, a row group per read."""

    def __init__(self, out: OutputDir, name: str):
        super().__init__(out, name)
        self.writer = pq.ParquetWriter(pa.PythonFile(self.hashing, mode="w"), _parquet_schema(), compression="zstd")

    def write(self, table: pa.Table) -> None:
        self.rows += len(table)
        self.writer.write_table(table.cast(_parquet_schema()), row_group_size=_READ_ROWS)

    def _finish(self) -> None:
        self.writer.close()


class TarShard(_ExportFile):
    """`shard-NNNNNN.tar`: per clip `KEY.json`, `KEY.mp4`, `KEY.txt`, as WebDataset reads them."""

    def __init__(self, out: OutputDir, name: str):
        super().__init__(out, name)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w", format=tarfile.PAX_FORMAT)

    def write(self, table: pa.Table) -> None:
        self.rows += len(table)
        for row in table.to_pylist():
            key = sample_key(row["clip_id"])
            _tar_member(self.tar, f"{key}.json", json.dumps(sample_metadata(row), sort_keys=True).encode())
            _tar_member(self.tar, f"{key}.mp4", row["video_bytes"] or b"")
            _tar_member(self.tar, f"{key}.txt", (row["caption"] or "").encode())

    def _finish(self) -> None:
        self.tar.close()


# format -> (file class, file name pattern, the shard columns it reads)
WRITERS = {"parquet": (ParquetPart, "part-{:06d}.parquet", PARQUET_COLUMNS),
           "webdataset": (TarShard, "shard-{:06d}.tar", TAR_COLUMNS)}


def _parquet_schema() -> pa.Schema:
    return pa.schema([schema.SHARDS.field(name) for name in PARQUET_COLUMNS])


def _prepare_output(out: OutputDir, overwrite: bool) -> None:
    """An empty folder to write into: a non-empty one only with `overwrite`, and then only a previous export's own
    files are removed (anything else in the folder is left alone)."""
    info = out.fs.get_file_info(out.root)
    if info.type == pafs.FileType.File:
        raise ExportError(f"--output {redact_uri(out.uri)} is a file: name a folder")
    names = [i.base_name for i in out.fs.get_file_info(pafs.FileSelector(out.root, allow_not_found=True))]
    if names and not overwrite:
        raise ExportError(f"--output {redact_uri(out.uri)} is not empty ({len(names)} entries): choose an empty "
                          "folder, or pass --overwrite to replace a previous export there")
    for name in names:
        if _OWN_FILE.fullmatch(name):
            out.delete(name)
    out.makedirs()


def _write_files(shards: lance.LanceDataset, order: list[int], out: OutputDir, config: ExportConfig) -> list[dict]:
    """The rows of `shards` at positions `order`, `rows_per_file` to a file, read a few at a time."""
    file_class, name, columns = WRITERS[config.format]
    total = math.ceil(len(order) / config.rows_per_file)
    files, started, last_log = [], time.monotonic(), time.monotonic()
    for number, start in enumerate(range(0, len(order), config.rows_per_file)):
        export_file = file_class(out, name.format(number))
        indices = order[start:start + config.rows_per_file]
        for at in range(0, len(indices), _READ_ROWS):
            export_file.write(shards.take(indices[at:at + _READ_ROWS], columns=columns))
        files.append(export_file.close())
        if time.monotonic() - last_log > _LOG_EVERY_S or number + 1 == total:
            log.info("wrote %d of %d files, %d/%d clips (%.0f s)", number + 1, total, start + len(indices),
                     len(order), time.monotonic() - started)
            last_log = time.monotonic()
    return files


def run_export(config: ExportConfig) -> dict:
    """Export the kept clips of `config.data`; returns what `_export.json` says."""
    if config.format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {config.format!r}")
    if config.rows_per_file < 1:
        raise ExportError(f"--rows-per-file must be at least 1, got {config.rows_per_file}")
    dataset, version = open_data(config.data)
    shards = dataset.open("shards", version)
    order = pc.sort_indices(shards.to_table(columns=["clip_id"])["clip_id"]).to_pylist()
    out = OutputDir(config.output)
    _prepare_output(out, config.overwrite)
    log.info("exporting %d kept clips of %s version %d as %s into %s", len(order), dataset.shown, version,
             config.format, redact_uri(out.uri))
    if not order:
        log.warning("%s version %d has no kept clips: the export holds only %s", dataset.shown, version, MANIFEST)
    summary = {"source": dataset.shown, "dataset_version": version, "format": config.format, "rows": len(order),
               "rows_per_file": config.rows_per_file, "order": "clip_id",
               "files": _write_files(shards, order, out, config)}
    if config.format == "parquet":
        summary["columns"] = PARQUET_COLUMNS
    else:
        summary["sample"] = {"key": "the clip_id; one with characters other than letters, digits, _ and - has them "
                                    "replaced by _ and a hash of the clip_id appended",
                             "mp4": "the clip (video_bytes)", "txt": "its caption (empty when none)",
                             "json": [*_META, "scores"]}
    out.write_bytes_atomic(MANIFEST, (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    return summary


def summary_text(summary: dict, output: str) -> str:
    """The lines `reelforge export-dataset` prints."""
    files = len(summary["files"])
    return (f"exported {summary['rows']} clips of {summary['source']} version {summary['dataset_version']} as "
            f"{summary['format']}: {files} file{'' if files == 1 else 's'} in {redact_uri(output)} (listed in "
            f"{MANIFEST})")
