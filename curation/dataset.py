"""The curated dataset: `videos`, `clips` and `shards` as Lance datasets under the output URI.

    OUTPUT/videos.lance   one row per video (key video_id), quarantined ones with their reason
    OUTPUT/clips.lance    one row per clip found (key clip_id), kept or with its drop_reason
    OUTPUT/shards.lance   the kept clips with their encoded bytes: what training reads

Lance gives what a hand-written manifest used to: every write is an atomic commit (also on object stores), every
commit is a version that can be read again, and `merge_insert` keyed by id makes a rerun rewrite rather than
duplicate. A reelforge dataset version N is the Lance tag `v000N` on each of the three datasets; the tag's metadata
holds the version's record (counts, filters, the config's hash, the MLflow run that made it). Readers see tagged
versions only, so rows a curation run has committed but not yet finished are never read by training.

`DIR@v3` (or `s3://bucket/dir@v3?...`) names version 3 of the dataset at DIR; without `@vN`, the newest version.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import lance
import pyarrow as pa

from curation import schema
from curation.redact import redact_uri

KINDS = ("videos", "clips", "shards")
KEYS = {"videos": "video_id", "clips": "clip_id", "shards": "clip_id"}
SCHEMAS = {"videos": schema.VIDEOS, "clips": schema.CLIPS, "shards": schema.SHARDS}
RECORD_KEY = "reelforge.version"
LEGACY_MANIFEST = "manifest.json"
_VERSION_SUFFIX = re.compile(r"@v(\d+)$")


def sql_list(values) -> str:
    """Strings as a Lance filter's IN list: `'a', 'it''s'`."""
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def version_tag(version: int) -> str:
    return f"v{version:04d}"


def split_version(data: str) -> tuple[str, int | None]:
    """`DIR@v3` -> (DIR, 3); `s3://b/dir@v3?endpoint_override=...` -> (s3://b/dir?endpoint_override=..., 3)."""
    if "://" in data:
        parts = urlsplit(data)
        match = _VERSION_SUFFIX.search(parts.path)
        if not match:
            return data, None
        return urlunsplit(parts._replace(path=parts.path[:match.start()])), int(match[1])
    match = _VERSION_SUFFIX.search(data)
    return (data[:match.start()], int(match[1])) if match else (data, None)


def lance_location(uri: str) -> tuple[str, dict[str, str]]:
    """A reelforge URI as Lance opens it: the location without credentials or query, and the storage options.

    Object-store URIs are written as for pyarrow (`s3://KEY:SECRET@bucket/path?endpoint_override=host:port&
    scheme=http&region=r`); without credentials in the URI, Lance takes them from the environment as AWS tools do."""
    if "://" not in uri:
        return os.path.abspath(uri), {}
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return unquote(parts.path), {}
    options: dict[str, str] = {}
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if parts.scheme == "s3":
        scheme = query.get("scheme", "https")
        if "endpoint_override" in query:
            endpoint = query["endpoint_override"]
            options["aws_endpoint"] = endpoint if "://" in endpoint else f"{scheme}://{endpoint}"
        if scheme == "http":
            options["allow_http"] = "true"
        if "region" in query:
            options["aws_region"] = query["region"]
        if parts.username:
            options["aws_access_key_id"] = unquote(parts.username)
            options["aws_secret_access_key"] = unquote(parts.password or "")
    netloc = parts.hostname or ""
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), options


class DatasetError(ValueError):
    """A curated dataset that cannot be read as asked: its message is one line, for the user."""


@dataclass
class Version:
    """One reelforge dataset version: its number, the Lance version of each table, and its record."""

    number: int
    lance_versions: dict[str, int]
    record: dict


class CuratedDataset:
    """The three tables of a curated output, opened at tagged versions (the readers' view) or at their newest
    commit (the curation run's view of its own unfinished work)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.shown = redact_uri(uri)
        self.location, self.storage_options = lance_location(uri)

    def table_uri(self, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return f"{self.location.rstrip('/')}/{kind}.lance"

    def exists(self) -> bool:
        try:
            self.open("videos")
        except DatasetError:
            return False
        return True

    def open(self, kind: str, version: int | None = None) -> lance.LanceDataset:
        """`kind` at reelforge version `version` (its tag), or at its newest commit when None."""
        uri = self.table_uri(kind)
        try:
            if version is None:
                return lance.dataset(uri, storage_options=self.storage_options or None)
            return lance.dataset(uri, version=version_tag(version), storage_options=self.storage_options or None)
        except (ValueError, FileNotFoundError, OSError) as err:
            raise DatasetError(self._open_problem(kind, version, err)) from None

    def _open_problem(self, kind: str, version: int | None, err: Exception) -> str:
        if version is not None and self.exists():
            known = ", ".join(f"v{v.number}" for v in self.versions()) or "none"
            return f"{self.shown} has no dataset version {version} (versions: {known})"
        if self.has_legacy_manifest():
            return (f"{self.shown} is in the Parquet layout of reelforge 0.1 (manifest.json): migrate it once with "
                    f"`reelforge migrate-dataset --data {self.shown}`")
        if "not found" in str(err).lower() or isinstance(err, FileNotFoundError):
            return f"{self.shown} has no curated dataset (no {kind}.lance): point --data at the output of " \
                   "`reelforge curate`"
        first_line = redact_uri(str(err).splitlines()[0] if str(err) else type(err).__name__)
        return f"{self.shown}: the curated {kind} table cannot be opened: {first_line[:300]}"

    def has_legacy_manifest(self) -> bool:
        from curation.discover import filesystem_and_path

        try:
            fs, root = filesystem_and_path(self.uri)
            import pyarrow.fs as pafs

            return fs.get_file_info(f"{root.rstrip('/')}/{LEGACY_MANIFEST}").type == pafs.FileType.File
        except (OSError, ValueError):
            return False

    def versions(self) -> list[Version]:
        """Every finished dataset version, oldest first (the tags on `videos`, the table a run tags last)."""
        tags = self.open("videos").tags.list()
        found = []
        for name, tag in tags.items():
            match = re.fullmatch(r"v(\d+)", name)
            metadata = tag.get("metadata") or {}
            if match and RECORD_KEY in metadata:  # without its record, the run died tagging: not finished
                record = json.loads(metadata[RECORD_KEY])
                found.append(Version(int(match[1]), record.get("lance_versions", {}), record))
        return sorted(found, key=lambda v: v.number)

    def latest(self) -> int | None:
        """The newest finished dataset version, or None before the first one."""
        versions = self.versions()
        return versions[-1].number if versions else None

    def resolve(self, version: int | None) -> int:
        """`version`, or the newest one; a clear error when there is none."""
        if version is not None:
            if version not in {v.number for v in self.versions()}:
                known = ", ".join(f"v{v.number}" for v in self.versions()) or "none"
                raise DatasetError(f"{self.shown} has no dataset version {version} (versions: {known})")
            return version
        latest = self.latest()
        if latest is None:
            raise DatasetError(f"{self.shown} has no finished dataset version yet: run `reelforge curate` into it "
                               "(an interrupted run finishes when rerun)")
        return latest

    def record(self, version: int | None = None) -> dict:
        """The record of `version` (default: the newest): counts, filters, config hash, run."""
        number = self.resolve(version)
        return next(v.record for v in self.versions() if v.number == number)

    def read(self, kind: str, version: int | None = None, columns: list[str] | None = None,
             filter: str | None = None) -> pa.Table:
        """A table at a finished dataset version (default: the newest), optionally only some columns or rows."""
        ds = self.open(kind, self.resolve(version))
        return ds.to_table(columns=columns, filter=filter)


def open_data(data: str) -> tuple[CuratedDataset, int]:
    """`--data DIR[@vN]` as (dataset, version number): the newest version when none is named."""
    uri, version = split_version(data)
    dataset = CuratedDataset(uri)
    return dataset, dataset.resolve(version)
