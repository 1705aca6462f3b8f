"""The curate workflow: discover, skip what is done, run the Ray Data plan, finalize tables, print a summary."""

from __future__ import annotations

import logging
import os
import time

import pyarrow.parquet as pq

from curation.config import CurateConfig
from curation.discover import list_videos
from curation.outputs import STAGING, OutputDir, finalize, read_manifest
from pipelines.config import to_dict, to_yaml

log = logging.getLogger("reelforge.curate")


def init_ray(config: CurateConfig) -> None:
    """Join the cluster we were submitted to (RAY_ADDRESS) or a configured one, else start a local one."""
    import ray

    if ray.is_initialized():
        return
    address = config.ray.address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True, "include_dashboard": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.ray.num_cpus, **kwargs)


def _known_ids(out: OutputDir, manifest: dict | None) -> set[str]:
    ids: set[str] = set()
    for version in (manifest or {}).get("versions", []):
        for f in version["files"]["videos"]:
            with out.fs.open_input_file(out.path(f["path"])) as handle:
                ids.update(pq.read_table(handle, columns=["video_id"])["video_id"].to_pylist())
    return ids


def run_curate(config: CurateConfig) -> dict:
    """Curate `config.input` into `config.output`; returns the manifest. Safe to rerun after any interruption."""
    if not config.input or not config.output:
        raise ValueError("curate needs --input and --output")
    started = time.perf_counter()
    out = OutputDir(config.output)
    out.makedirs(STAGING)
    manifest = read_manifest(out)
    known = _known_ids(out, manifest)
    init_ray(config)
    from curation.plan import curate_plan, discover_ids

    files = list_videos(config.input, config.discover)
    log.info("found %d video files under %s", len(files), config.input)
    listed = discover_ids(files, config)
    by_id: dict[str, dict] = {}
    duplicates: dict[str, str] = {}
    for row in sorted(listed, key=lambda r: r["uri"]):
        if row["video_id"] in by_id:
            duplicates[row["uri"]] = row["video_id"]
        else:
            by_id[row["video_id"]] = row
    staged = {name.removesuffix(".parquet") for name in out.list(STAGING, ".parquet")}
    for video_id in staged & known:  # finalized by a run that stopped before cleaning up
        out.delete(f"{STAGING}/{video_id}.parquet")
    pending = [r for vid, r in sorted(by_id.items()) if vid not in known and vid not in staged]
    log.info("%d new videos to process (%d already finalized, %d staged by an interrupted run, %d duplicates)",
             len(pending), len(known & set(by_id)), len(staged - known), len(duplicates))
    processed_seconds = 0.0
    if pending:
        for batch in curate_plan(pending, config).iter_batches(batch_size=1, batch_format="pandas"):
            processed_seconds += float(batch["seconds"].sum())
    wall = time.perf_counter() - started
    if not out.list(STAGING, ".parquet") and manifest is not None:
        log.info("nothing new: dataset version %d is up to date", manifest["dataset_version"])
        return manifest
    version = (manifest["dataset_version"] + 1) if manifest else 1
    new_manifest = finalize(out, to_dict(config), to_yaml(config), version, manifest, duplicates,
                            config.output_files.table_rows, config.output_files.shard_rows)
    new_manifest["run"] = {"wall_seconds": wall, "video_seconds_processed": processed_seconds,
                           "video_seconds_per_wall_second": processed_seconds / wall if wall > 0 else 0.0}
    return new_manifest


def summary_text(manifest: dict) -> str:
    counts = manifest["versions"][-1]["counts"]
    run = manifest.get("run", {})
    quarantined = ", ".join(f"{k}: {v}" for k, v in sorted(counts["quarantined"].items())) or "none"
    drops = ", ".join(f"{k}: {v}" for k, v in sorted(counts["drop_reasons"].items())) or "none"
    lines = [
        f"dataset version {manifest['dataset_version']}",
        f"videos read: {counts['videos']} ({counts['videos_ok']} ok)",
        f"videos quarantined: {sum(counts['quarantined'].values())} ({quarantined})",
        f"clips found: {counts['clips']}",
        f"clips kept: {counts['clips_kept']} (dropped: {drops})",
    ]
    if run:
        lines.append(f"video-seconds per wall-second: {run['video_seconds_per_wall_second']:.2f} "
                     f"({run['video_seconds_processed']:.1f} s of video in {run['wall_seconds']:.1f} s)")
    return "\n".join(lines)
