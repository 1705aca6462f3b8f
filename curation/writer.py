"""Writing a dataset version: finished videos committed in batches, then the run-wide filters, then the tags.

While a version is being made, each batch of finished videos is one `merge_insert` into each table keyed by id
(shards first, the `videos` rows last: a video is done once its row is committed), so kill -9 loses at most the
batch in flight and a rerun skips every committed video. New rows carry the version number they belong to, and
clips await their verdict (`kept` null). Finishing the version takes steps that are each one commit and each safe
to repeat after a crash:

1. the run-wide filters (percentiles need every clip of the run) resolved once; their bounds stored in the clips
   table's config, then the verdicts committed as one update of `kept` and `drop_reason`;
2. the shards table takes the verdicts too, and the dropped clips' bytes leave it;
3. the kept clips' embeddings join the vector index (embeddings.lance, keyed by clip_id);
4. the report and MLflow; then each table is compacted and tagged `v000N` with the version's record (`videos`
   last: its tag is what makes the version exist for readers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import timedelta

import lance
import pyarrow as pa

from curation import schema
from curation.config import CurateConfig
from curation.dataset import KEYS, KINDS, RECORD_KEY, SCHEMAS, CuratedDataset, DatasetError, sql_list, version_tag
from curation.filters import SCORES, Bound, ClipFilter, apply_late_filters, clip_scores, reason_filters
from curation.redact import redact_uri

log = logging.getLogger(__name__)

FILTERS_KEY = "reelforge.filters.{tag}"  # the clips table's config: the run-wide bounds of an unfinished version
# What resolving the filters reads of each clip: no keyframes, no embeddings, no bytes.
_SCORE_COLUMNS = ["clip_id", "video_id", "start_s", "end_s", "motion_mean", "motion_median", "drop_reason",
                  "aesthetic", "caption_match", "score_model", "kept", "text_area"]


def create_tables(dataset: CuratedDataset) -> None:
    """The three empty tables, where they do not exist yet (two runs creating them at once is harmless); a table of
    an older schema gains the columns added since as nulls (a metadata-only commit)."""
    for kind in KINDS:
        try:
            _add_missing_columns(dataset.open(kind), SCHEMAS[kind])
        except DatasetError:
            try:
                lance.write_dataset(SCHEMAS[kind].empty_table(), dataset.table_uri(kind), mode="create",
                                    storage_options=dataset.storage_options or None)
            except (OSError, ValueError):
                dataset.open(kind)  # made by the other run meanwhile; any other problem raises here


def _add_missing_columns(table: lance.LanceDataset, wanted: pa.Schema) -> None:
    names = set(table.schema.names)
    missing = [f for f in wanted if f.name not in names]
    if missing:
        table.add_columns(missing)


def video_status(dataset: CuratedDataset) -> dict[str, tuple[str, int]]:
    """video_id -> (status, dataset_version) of every committed video, finished versions and the unfinished one."""
    table = dataset.open("videos").to_table(columns=["video_id", "status", "dataset_version"])
    return {v: (s, n) for v, s, n in zip(table["video_id"].to_pylist(), table["status"].to_pylist(),
                                         table["dataset_version"].to_pylist(), strict=True)}


def _upsert(dataset: CuratedDataset, kind: str, rows: list[dict]) -> None:
    if not rows:
        return
    table = pa.Table.from_pylist(rows, schema=SCHEMAS[kind])
    (dataset.open(kind).merge_insert(KEYS[kind]).when_matched_update_all().when_not_matched_insert_all()
     .execute(table))


class BatchCommitter:
    """Collects finished videos (staged records: a videos row with its clips) and commits them every
    `every` videos; `flush()` commits what is left."""

    def __init__(self, dataset: CuratedDataset, version: int, every: int):
        self.dataset, self.version, self.every = dataset, version, max(1, every)
        self.records: list[dict] = []
        self.committed = 0

    def add(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.records:
            return
        videos, clips, shards = [], [], []
        for record in self.records:
            video, video_clips, video_shards = self._rows(record)
            videos.append(video)
            clips.extend(video_clips)
            shards.extend(video_shards)
        _upsert(self.dataset, "shards", shards)
        _upsert(self.dataset, "clips", clips)
        _upsert(self.dataset, "videos", videos)
        self.committed += len(self.records)
        self.records = []

    def _rows(self, record: dict) -> tuple[dict, list[dict], list[dict]]:
        """One staged record as its videos row, clip rows (verdict pending) and shard candidates. URIs and messages
        are kept as logs show them: credentials masked."""
        record = dict(record, uri=redact_uri(record["uri"]), error_message=redact_uri(record["error_message"]),
                      dataset_version=self.version)
        video = {k: record.get(k) for k in schema.VIDEOS.names}
        clips, shards = [], []
        for clip in record.get("clips") or []:
            row = {k: clip.get(k) for k in schema.CLIPS.names}
            row.update(dataset_version=self.version, kept=None)
            clips.append(row)
            if clip.get("video_bytes") is not None and clip.get("drop_reason") is None:
                # The bytes' own rate and frame count (a clip encoded before encode.fps holds every frame).
                encoded = {"fps": clip.get("encode_fps") or video["fps"],
                           "num_frames": clip.get("encode_frames") or row["num_frames"]}
                shards.append({**row, "uri": video["uri"], **encoded, "width": clip["width"],
                               "height": clip["height"], "video_bytes": clip["video_bytes"]})
        return video, clips, shards


@dataclass
class VersionWrite:
    """One dataset version as finished: what its record and report need about its videos and clips."""

    version: int
    counts: dict
    bounds: list[dict]  # every filter threshold: score, side, value, percentile, applied, label
    untrained: bool
    warnings: list[str]
    retried: list[str] = field(default_factory=list)  # quarantined video_ids this version processed again
    scores: list[dict] = field(default_factory=list)  # per clip: ids, score values, kept, drop_reason
    samples: list[dict] = field(default_factory=list)  # sample clips with their middle keyframe, for the report


def _bound_dict(b: Bound) -> dict:
    return {"score": b.score, "side": b.side, "value": b.value, "percentile": b.percentile, "applied": b.applied,
            "label": b.label}


def _scores(dataset: CuratedDataset, version: int, motion_stat: str) -> tuple[list[dict], dict[str, dict]]:
    """The version's clips with their scores (and current kept/drop_reason), and its videos by id."""
    where = f"dataset_version = {version}"
    videos = dataset.open("videos").to_table(
        columns=["video_id", "status", "error_class", "width", "height", "duration_s"], filter=where).to_pylist()
    by_video = {v["video_id"]: v for v in videos}
    clips = []
    for clip in dataset.open("clips").to_table(columns=_SCORE_COLUMNS, filter=where).to_pylist():
        video = by_video.get(clip["video_id"])
        if video is None:
            continue  # its video was not committed (killed mid-batch) and is gone from the input: not in this version
        width, height = video["width"], video["height"]
        short_side = min(width, height) if width and height else None
        clips.append({"clip_id": clip["clip_id"], "video_id": clip["video_id"], "kept": clip["kept"],
                      "drop_reason": clip["drop_reason"], "score_model": clip["score_model"],
                      **clip_scores(clip, short_side, motion_stat)})
    return clips, by_video


def verdicts_committed(dataset: CuratedDataset, version: int) -> bool:
    """Whether an (unfinished) version's run-wide filters were resolved and its verdicts committed: such a version
    is finished as judged, never judged again with more clips."""
    if FILTERS_KEY.format(tag=version_tag(version)) not in dataset.open("clips").config():
        return False
    return dataset.open("clips").count_rows(f"dataset_version = {version} AND kept IS NULL") == 0


def _resolve_filters(dataset: CuratedDataset, config: CurateConfig, version: int,
                     clips: list[dict]) -> tuple[list[dict], bool, list[str]]:
    """Step 1: the verdicts of every clip of the version, committed once; a rerun reads back what was committed."""
    key = FILTERS_KEY.format(tag=version_tag(version))
    clips_table = dataset.open("clips")
    untrained = any("untrained" in (c["score_model"] or "") for c in clips)
    pending = any(c["kept"] is None for c in clips)
    if not pending and key in clips_table.config():
        stored = json.loads(clips_table.config()[key])
        return stored["bounds"], stored["untrained"], stored["warnings"]
    outcome = apply_late_filters(config.filters, [{k: c[k] for k in SCORES} for c in clips],
                                 [c["drop_reason"] for c in clips], untrained)
    bounds = [_bound_dict(b) for b in ClipFilter(config.filters).early_bounds() + outcome.bounds]
    dedup = _dedup(dataset, config, version, clips, outcome.reasons, untrained)
    bounds += dedup.bounds
    outcome.warnings.extend(dedup.warnings)
    clips_table.update_config({key: json.dumps({"bounds": bounds, "untrained": untrained,
                                                "warnings": outcome.warnings})})
    for clip, reason in zip(clips, outcome.reasons, strict=True):
        reason = reason or dedup.reasons.get(clip["clip_id"])
        clip.update(kept=reason is None, drop_reason=reason, **dedup.nearest.get(clip["clip_id"], {}))
    verdicts = pa.table({"clip_id": pa.array([c["clip_id"] for c in clips], pa.string()),
                         "kept": pa.array([c["kept"] for c in clips], pa.bool_()),
                         "drop_reason": pa.array([c["drop_reason"] for c in clips], pa.string())})
    if len(verdicts):
        dataset.open("clips").merge_insert("clip_id").when_matched_update_all().execute(verdicts)
    return bounds, untrained, outcome.warnings


def _dedup(dataset: CuratedDataset, config: CurateConfig, version: int, clips: list[dict], reasons: list[str | None],
           untrained: bool):
    """The dedup filter over the clips every other filter kept (curation/dedup.py)."""
    from curation.dedup import deduplicate

    candidates = [c for c, reason in zip(clips, reasons, strict=True) if reason is None]
    return deduplicate(dataset, config.filters.dedup, version, candidates, trained=not untrained)


def _apply_to_shards(dataset: CuratedDataset, version: int, clips: list[dict]) -> None:
    """Step 2: the shard candidates of the version take their verdict; dropped ones (and any whose video was never
    committed) leave the table."""
    kept = [c["clip_id"] for c in clips if c["kept"]]
    shards = dataset.open("shards")
    if kept:
        table = pa.table({"clip_id": pa.array(kept, pa.string()), "kept": pa.array([True] * len(kept)),
                          "drop_reason": pa.array([None] * len(kept), pa.string())})
        shards.merge_insert("clip_id").when_matched_update_all().execute(table)
        shards = dataset.open("shards")
    if shards.count_rows(f"dataset_version = {version} AND (kept IS NULL OR NOT kept)"):
        shards.delete(f"dataset_version = {version} AND (kept IS NULL OR NOT kept)")


def _drop_orphans(dataset: CuratedDataset, version: int, video_ids: set[str]) -> None:
    """Clip rows of the version whose video row was never committed (killed mid-batch, then the file left the
    input) do not belong to it."""
    clips = dataset.open("clips").to_table(columns=["clip_id", "video_id"], filter=f"dataset_version = {version}")
    orphans = sorted(set(clips["video_id"].to_pylist()) - video_ids)
    if orphans:
        quoted = sql_list(orphans)
        for kind in ("clips", "shards"):
            dataset.open(kind).delete(f"dataset_version = {version} AND video_id IN ({quoted})")


def _counts(videos: dict[str, dict], clips: list[dict], retried: int) -> dict:
    counts = {"videos": 0, "videos_ok": 0, "quarantined": {}, "clips": 0, "clips_kept": 0, "clips_dropped": 0,
              "drop_reasons": {}, "video_seconds": 0.0, "superseded": retried}
    seconds = []
    for video in videos.values():
        counts["videos"] += 1
        if video["status"] == "ok":
            counts["videos_ok"] += 1
            seconds.append(video["duration_s"] or 0.0)
        else:
            counts["quarantined"][video["error_class"]] = counts["quarantined"].get(video["error_class"], 0) + 1
    for clip in clips:
        counts["clips"] += 1
        if clip["kept"]:
            counts["clips_kept"] += 1
            continue
        counts["clips_dropped"] += 1
        for failed in reason_filters(clip["drop_reason"]):  # a clip failing several filters counts under each
            counts["drop_reasons"][failed] = counts["drop_reasons"].get(failed, 0) + 1
    counts["video_seconds"] = math.fsum(seconds)  # exactly rounded, so a rerun that reads rows in another order agrees
    return counts


def _sample_key(clip_id: str) -> str:
    return hashlib.sha1(clip_id.encode()).hexdigest()


def pick_samples(clips: list[dict], count: int) -> tuple[list[str], list[str]]:
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


def _samples(dataset: CuratedDataset, clips: list[dict], count: int) -> list[dict]:
    kept, dropped = pick_samples(clips, count)
    wanted = kept + dropped
    if not wanted:
        return []
    quoted = sql_list(wanted)
    rows = dataset.open("clips").to_table(columns=["clip_id", "caption", "keyframes"],
                                          filter=f"clip_id IN ({quoted})").to_pylist()
    extra = {r["clip_id"]: r for r in rows}
    by_id = {c["clip_id"]: c for c in clips}
    samples = []
    for clip_id in wanted:
        keyframes = extra.get(clip_id, {}).get("keyframes") or []
        samples.append({**by_id[clip_id], "caption": extra.get(clip_id, {}).get("caption"),
                        "keyframe": keyframes[len(keyframes) // 2] if keyframes else None})
    return samples


def finish_filters(dataset: CuratedDataset, config: CurateConfig, version: int, retried: list[str]) -> VersionWrite:
    """Steps 1 and 2 for the version's committed videos: verdicts, shards, counts and report samples."""
    motion_stat = config.filters.motion_stat
    clips, videos = _scores(dataset, version, motion_stat)
    _drop_orphans(dataset, version, set(videos))
    bounds, untrained, warnings = _resolve_filters(dataset, config, version, clips)
    _apply_to_shards(dataset, version, clips)
    return VersionWrite(version=version, counts=_counts(videos, clips, len(retried)), bounds=bounds,
                        untrained=untrained, warnings=list(warnings), retried=sorted(retried), scores=clips,
                        samples=_samples(dataset, clips, config.report.samples))


def index_embeddings(dataset: CuratedDataset, version: int) -> str | None:
    """The version's kept clips' CLIP embeddings into OUTPUT/embeddings.lance, the vector index semantic
    deduplication queries (a version's new clips against every earlier kept clip); a rerun adds nothing twice.
    Returns a warning when they cannot go in (embeddings of another size: another model made them)."""
    from curation.embedding_index import EmbeddingIndex

    clips = dataset.open("clips").to_table(columns=["clip_id", "video_id", "dataset_version", "clip_embedding"],
                                           filter=f"dataset_version = {version} AND kept")
    index = EmbeddingIndex.beside(dataset.location, dataset.storage_options)
    try:
        index.add(clips.rename_columns(["clip_id", "video_id", "dataset_version", "embedding"]))
    except ValueError as err:
        return f"the clips' embeddings were not indexed: {err}"
    index.build()
    return None


# Compaction: each commit adds small fragments. Compacting at every version would rewrite the whole table each time
# and every tag would keep its copy (bench/lance_datasets.py: 460 MB on disk for 10.5 MB of rows at version 100).
# So a table is compacted once it holds COMPACT_AT_FRAGMENTS fragments, into fragments of about FRAGMENT_BYTES;
# full fragments are left alone, so a row is rewritten a few times in its life, not once per version.
COMPACT_AT_FRAGMENTS = 64
FRAGMENT_BYTES = 512 * 2**20


def compact(dataset: CuratedDataset, kind: str) -> bool:
    """Compact `kind` when it has many small fragments; returns whether it did."""
    table = dataset.open(kind)
    fragments = table.get_fragments()
    rows = table.count_rows()
    if len(fragments) < COMPACT_AT_FRAGMENTS or rows == 0:
        return False
    size = sum(file.file_size_bytes or 0 for fragment in fragments for file in fragment.data_files())
    bytes_per_row = max(1, size // rows)
    table.optimize.compact_files(target_rows_per_fragment=max(1024, FRAGMENT_BYTES // bytes_per_row),
                                 materialize_deletions=True)
    return True


def tag_version(dataset: CuratedDataset, version: int, record: dict) -> dict:
    """Step 4: compact each table where due and tag it `v000N` with the record; `videos` last, so the version exists
    for readers only once every table has its tag. Repeating it moves a tag left by a crash to the newest commit."""
    tag = version_tag(version)
    lance_versions = {}
    for kind in ("shards", "clips", "videos"):
        compact(dataset, kind)
        lance_versions[kind] = dataset.open(kind).version
    full = {**record, "lance_versions": lance_versions}
    for kind in ("shards", "clips", "videos"):
        table = dataset.open(kind)
        if tag in table.tags.list():
            table.tags.update(tag, lance_versions[kind])
        else:
            table.tags.create(tag, lance_versions[kind])
        table.tags.replace_metadata(tag, {RECORD_KEY: json.dumps(full, default=str)})
    dataset.open("clips").delete_config_keys([FILTERS_KEY.format(tag=tag)])
    for kind in KINDS:
        remove_untagged_versions(dataset, kind)
    return full


def remove_untagged_versions(dataset: CuratedDataset, kind: str) -> None:
    """Delete the files only the commits between tags used (a version's batches, its rows before their verdicts):
    readers only ever open tagged versions, and every tag keeps its version."""
    try:
        dataset.open(kind).cleanup_old_versions(older_than=timedelta(0), error_if_tagged_old_versions=False)
    except OSError as err:  # the version is made; the space is reclaimed by the next one
        log.warning("could not remove the untagged versions of %s: %s", kind, err)
