"""`reelforge migrate-dataset`: a curated output in the Parquet layout of reelforge 0.1 (manifest.json) converted in
place into the Lance tables, one tagged dataset version per manifest version, so `DIR@vN` reads what version N was.
The Parquet files, manifest.json, config-v000N.yaml and reports/ stay where they are; a rerun finishes or says done."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from curation.config import OutputConfig
from curation.dataset import KINDS, CuratedDataset, split_version, version_tag
from curation.legacy import MIGRATED_FROM, STAGING, LegacyLayoutError, checked_manifest, migrate_version
from curation.lock import CurateLock, OutputBusy
from curation.outputs import OutputDir
from curation.redact import redact_uri
from curation.writer import create_tables

log = logging.getLogger("reelforge.migrate")


@dataclass
class MigrateResult:
    """What a migrate-dataset invocation found and did."""

    data: str  # the output, credentials masked
    versions: list[int]  # every version of the manifest
    migrated: list[int] = field(default_factory=list)  # the versions this invocation migrated
    rows: dict[str, int] = field(default_factory=dict)  # rows per table at the newest version
    staged: int = 0  # videos staged by an unfinished 0.1 run: in no version, so not migrated


def _pending(dataset: CuratedDataset, manifest: dict) -> list[int]:
    """The manifest versions still to migrate, in order; a one-line error when the Lance tables hold anything but
    an earlier, interrupted migration of this manifest."""
    numbers = [entry["version"] for entry in manifest["versions"]]
    if not dataset.exists():
        return numbers
    tagged = {v.number: v.record for v in dataset.versions()}
    done = [n for n in numbers if tagged.get(n, {}).get("migrated_from") == MIGRATED_FROM]
    if done == numbers:
        return []  # later versions made by `reelforge curate` on the migrated tables are fine
    foreign = sorted(n for n, record in tagged.items() if record.get("migrated_from") != MIGRATED_FROM)
    if foreign:
        raise LegacyLayoutError(
            f"{dataset.shown} holds both manifest.json and Lance dataset versions that `reelforge curate` wrote "
            f"({', '.join(f'v{n}' for n in foreign)}): migrating would mix two histories; move videos.lance, "
            "clips.lance and shards.lance (or manifest.json and its Parquet folders) elsewhere first")
    if done != numbers[:len(done)]:
        raise LegacyLayoutError(f"{dataset.shown}: migrated versions {done} are not the first of {numbers}: the "
                                "Lance tables were changed by hand; move them away and migrate again")
    newest = numbers[-1] if numbers else 0
    for kind in KINDS:
        if dataset.open(kind).count_rows(f"dataset_version > {newest}"):
            raise LegacyLayoutError(
                f"{dataset.shown}: its {kind} table has rows of a dataset version after {newest}, the newest in "
                "manifest.json (a `reelforge curate` run of the Lance layout wrote into it): move videos.lance, "
                "clips.lance and shards.lance elsewhere first")
    return numbers[len(done):]


def _result(dataset: CuratedDataset, out: OutputDir, manifest: dict, migrated: list[int]) -> MigrateResult:
    numbers = [entry["version"] for entry in manifest["versions"]]
    rows = {kind: dataset.open(kind, numbers[-1]).count_rows() for kind in KINDS} if numbers else {}
    return MigrateResult(dataset.shown, numbers, migrated, rows, len(out.list(STAGING, ".parquet")))


def run_migrate(data: str, lock_timeout_s: float = OutputConfig.lock_timeout_s) -> MigrateResult:
    """Migrate the 0.1 layout at `data` (a local path or URI) into Lance tables. Holds the curation lease while it
    writes, so no `reelforge curate` run writes into the output at the same time."""
    uri, version = split_version(data)
    if version is not None:
        raise LegacyLayoutError(f"--data {redact_uri(data)}: migrate-dataset converts every version of an output; "
                                f"drop @v{version}")
    dataset, out = CuratedDataset(uri), OutputDir(uri)
    if not out.exists("manifest.json") and dataset.exists():
        known = ", ".join(f"v{v.number}" for v in dataset.versions()) or "none finished yet"
        raise LegacyLayoutError(f"{dataset.shown} is already a Lance curated dataset (versions: {known}) and has no "
                                "manifest.json of reelforge 0.1: there is nothing to migrate")
    manifest = checked_manifest(out)
    if not _pending(dataset, manifest):
        return _result(dataset, out, manifest, [])
    create_tables(dataset)
    migrated = []
    try:
        with CurateLock(dataset, lock_timeout_s) as lock:
            for number in _pending(dataset, manifest):  # again under the lease: another migration may have run
                lock.check()
                log.info("migrating dataset version %d of %d (%s)", number, len(manifest["versions"]),
                         version_tag(number))
                migrate_version(dataset, out, manifest, manifest["versions"][number - 1])
                migrated.append(number)
    except OutputBusy as err:
        raise LegacyLayoutError(str(err)) from None
    return _result(dataset, out, manifest, migrated)


def _span(numbers: list[int]) -> str:
    return f"{numbers[0]}" if len(numbers) == 1 else f"{numbers[0]}-{numbers[-1]}"


def summary_text(result: MigrateResult) -> str:
    """The lines `reelforge migrate-dataset` prints."""
    if not result.versions:
        return f"{result.data}: manifest.json lists no dataset version: nothing to migrate"
    newest = result.versions[-1]
    tags = f"{version_tag(result.versions[0])}..{version_tag(newest)}" if len(result.versions) > 1 \
        else version_tag(newest)
    if not result.migrated:
        lines = [f"{result.data} is already migrated: dataset versions {_span(result.versions)} are the Lance tags "
                 f"{tags} (nothing to do)"]
    else:
        lines = [f"migrated {result.data}: dataset versions {_span(result.versions)} are now the Lance tags {tags} "
                 f"of videos.lance, clips.lance and shards.lance ({len(result.migrated)} migrated by this run)",
                 "the Parquet files and manifest.json are left as they were; readers now use the Lance tables"]
    lines.append(f"version {newest}: {result.rows['videos']} videos, {result.rows['clips']} clips, "
                 f"{result.rows['shards']} kept clips")
    if result.staged:
        lines.append(f"WARNING: {result.staged} videos staged by an unfinished 0.1 run (_staging/) are in no version "
                     "and were not migrated: the next `reelforge curate` processes them again")
    return "\n".join(lines)
