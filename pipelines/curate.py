"""The curate workflow: discover, skip what is done, run the Ray Data plan, filter and finalize a new dataset version,
write its report, and record it all as one MLflow run."""

from __future__ import annotations

import logging
import os
import posixpath
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from curation.config import CurateConfig
from curation.discover import list_videos
from curation.filters import ClipFilter
from curation.outputs import (
    REPORTS,
    STAGING,
    OutputDir,
    VersionWrite,
    commit_version,
    latest_status,
    read_manifest,
    version_video_ids,
    write_version,
)
from curation.redact import redact_config, redact_uri, redacted_yaml
from pipelines.cluster import init_ray
from pipelines.config import flatten
from pipelines.tracking import client_for, finish_run, log_params, open_run, tracking_uri

log = logging.getLogger("reelforge.curate")

# The MLflow run of the version being built: a run interrupted before its manifest is resumed by the next invocation
# (same staged videos, same version number); once the manifest names the run, the next invocation starts a new one.
RUN_ID_FILE = f"{STAGING}/mlflow_run_id"


def curate_tracking_uri(config: CurateConfig, out: OutputDir) -> str | None:
    """tracking.uri, else MLFLOW_TRACKING_URI, else SQLite beside a local output or under ./mlruns for a remote one."""
    if not config.tracking.enabled:
        return None
    if config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking_uri(config.tracking.uri, ".")
    if out.is_local:
        return tracking_uri(None, out.root)
    default = Path.cwd() / "mlruns"
    log.info("the output %s is remote: MLflow runs go to %s/mlflow.db in the working directory (set tracking.uri "
             "or MLFLOW_TRACKING_URI to share a store)", redact_uri(out.uri), default)
    return tracking_uri(None, default)


def _start_run(uri: str, config: CurateConfig, out: OutputDir, manifest: dict | None, version: int) -> str:
    """Reopen the MLflow run of an interrupted invocation (its id kept in the output's staging folder, which may be
    remote), else open a new one."""
    previous = out.read_text(RUN_ID_FILE).strip() if out.exists(RUN_ID_FILE) else None
    committed = {v.get("run", {}).get("mlflow_run_id") for v in (manifest or {}).get("versions", [])}
    resumable = previous if previous and previous not in committed else None
    run_id = open_run(uri, config.tracking.experiment, resumable, run_name=f"curate-v{version:04d}",
                      tags={"reelforge.step": "curate", "reelforge.output": config.output},
                      parent_run_id=config.tracking.parent_run_id)
    if run_id == previous:
        log.info("resuming MLflow run %s of the interrupted run", run_id)
    out.write_bytes_atomic(RUN_ID_FILE, run_id.encode())
    return run_id


def _public_uri(uri: str) -> str:
    """The tracking URI without any user:password, for the manifest."""
    parts = urlsplit(uri)
    if parts.password is not None or parts.username is not None:
        uri = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return redact_uri(uri)


def check_weights(config: CurateConfig) -> None:
    """The model stages' weights, before any work: a hub id must name its commit, and a checkpoint file given with a
    sha256 must be that file (checked here once; the stages then load it on the workers)."""
    from pipelines.config import ConfigError

    for key, section in (("captions", config.captions), ("clip_scores", config.clip_scores)):
        names = f"{section.model_name or ''} {section.pretrained or ''}"
        if not section.enabled or not (section.pretrained_sha256 or "hf-hub:" in names):
            continue  # nothing to pin (and open_clip, slow to import, is not needed on the driver)
        from models.clip_scorer import WeightsError, check_checkpoint, weights_problem

        problem = weights_problem(section.model_name, section.pretrained, section.pretrained_sha256)
        if problem:
            raise ConfigError(f"{key}: {problem}")
        if section.pretrained_sha256:
            try:
                check_checkpoint(section.pretrained, section.pretrained_sha256)
            except WeightsError as err:
                raise ConfigError(f"{key}.pretrained_sha256: {err}") from None


def curation_metrics(counts: dict, run: dict) -> dict[str, float]:
    """Counts per stage and per reason as MLflow metrics (a clip dropped by several filters counts under each)."""
    metrics = {
        "videos_read": counts["videos"],
        "videos_ok": counts["videos_ok"],
        "videos_quarantined": sum(counts["quarantined"].values()),
        "videos_superseded": counts.get("superseded", 0),
        "clips_found": counts["clips"],
        "clips_kept": counts["clips_kept"],
        "clips_dropped": counts["clips_dropped"],
        "video_seconds": counts["video_seconds"],
    }
    metrics.update({f"quarantined.{reason}": n for reason, n in counts["quarantined"].items()})
    metrics.update({f"dropped_by.{name}": n for name, n in counts["drop_reasons"].items()})
    for key in ("videos_processed", "wall_seconds", "video_seconds_processed", "video_seconds_per_wall_second"):
        if key in run:
            metrics[key] = run[key]
    return {k: float(v) for k, v in metrics.items()}


def log_version_to_mlflow(uri: str, run_id: str, config: CurateConfig, written: VersionWrite, run: dict,
                          report_dir: Path | None, retry_quarantined: bool) -> None:
    """Params (the resolved config, flattened), metrics, tags and the report of one dataset version."""
    from mlflow.entities import Metric, RunTag

    client = client_for(uri)
    log_params(client, run_id, flatten(config))
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in curation_metrics(written.counts, run).items()]
    learned = ClipFilter(config.filters).learned_filters_set()
    untrained_filters = "none"
    if written.untrained and learned:
        untrained_filters = "applied" if config.filters.apply_on_untrained else "skipped"
    tags = {
        "dataset_version": str(written.version),
        "output_uri": redact_uri(config.output),
        "input_uri": redact_uri(config.input),
        "scores_untrained": str(written.untrained).lower(),
        "untrained_filters": untrained_filters,
        "retry_quarantined": str(retry_quarantined).lower(),
    }
    if written.warnings:
        tags["warnings"] = redact_uri(" | ".join(written.warnings))[:5000]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start:start + 500])
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, redacted_yaml(config), "config.yaml")
    if report_dir is not None:
        client.log_artifacts(run_id, str(report_dir), artifact_path="report")


def _write_report(out: OutputDir, written: VersionWrite, config: CurateConfig, directory: Path) -> list[str]:
    """The report into `directory` (for MLflow) and under OUTPUT/reports/vNNNN/ (it travels with the data)."""
    from curation.report import write_report

    rel_dir = posixpath.join(REPORTS, f"v{written.version:04d}")
    out.makedirs(rel_dir)
    paths = []
    for path in write_report(directory, written, config.filters.motion_stat, config.report.columns):
        rel = posixpath.join(rel_dir, path.name)
        out.write_bytes_atomic(rel, path.read_bytes())
        paths.append(rel)
    return paths


def run_curate(config: CurateConfig, retry_quarantined: bool = False) -> dict:
    """Curate `config.input` into `config.output`; returns the manifest. Safe to rerun after any interruption.

    Only videos not seen before (by video_id) are processed, plus, with `retry_quarantined`, those whose latest row
    is quarantined; they become the next dataset version."""
    if not config.input or not config.output:
        raise ValueError("curate needs --input and --output")
    ClipFilter(config.filters)  # a bad filter setting fails before any work
    check_weights(config)
    started = time.perf_counter()
    out = OutputDir(config.output)
    out.makedirs(STAGING)
    manifest = read_manifest(out)
    known = latest_status(out, manifest)
    init_ray(config)
    from curation.plan import curate_plan, discover_ids

    files = list_videos(config.input, config.discover)
    log.info("found %d video files under %s", len(files), redact_uri(config.input))
    listed = discover_ids(files, config)
    by_id: dict[str, dict] = {}
    duplicates: dict[str, str] = {}
    for row in sorted(listed, key=lambda r: r["uri"]):
        if row["video_id"] in by_id:
            duplicates[row["uri"]] = row["video_id"]
        else:
            by_id[row["video_id"]] = row
    staged = {name.removesuffix(".parquet") for name in out.list(STAGING, ".parquet")}
    # Records finalized by a run that stopped before cleaning up: in the newest version, or finalized ok anywhere.
    # (A quarantined video re-staged by an interrupted --retry-quarantined run is kept: it is the new outcome.)
    finalized = set(version_video_ids(out, manifest["versions"][-1])) if manifest else set()
    finalized |= {v for v, status in known.items() if status == "ok"}
    for video_id in staged & finalized:
        out.delete(f"{STAGING}/{video_id}.parquet")
    staged -= finalized
    retry = {v for v, status in known.items() if status == "quarantined"} if retry_quarantined else set()
    pending = [r for vid, r in sorted(by_id.items()) if (vid not in known or vid in retry) and vid not in staged]
    log.info("%d new videos to process (%d already finalized, %d staged by an interrupted run, %d duplicates, "
             "%d quarantined retried)", len(pending), len(set(known) & set(by_id)), len(staged), len(duplicates),
             len(retry & {r["video_id"] for r in pending}))
    if not pending and not staged and manifest is not None:
        log.info("nothing new: dataset version %d is up to date", manifest["dataset_version"])
        return {**manifest, "run": {"nothing_new": True}}
    version = (manifest["dataset_version"] + 1) if manifest else 1
    uri = curate_tracking_uri(config, out)
    run_id = _start_run(uri, config, out, manifest, version) if uri else None
    try:
        processed_seconds, processed = 0.0, 0
        if pending:
            for batch in curate_plan(pending, config).iter_batches(batch_size=1, batch_format="pandas"):
                processed_seconds += float(batch["seconds"].sum())
                processed += len(batch)
        wall = time.perf_counter() - started
        written = write_version(out, config, redacted_yaml(config), version, known)
        for warning in written.warnings:
            log.warning("!!! %s", warning)
        run = {"wall_seconds": wall, "videos_processed": processed, "video_seconds_processed": processed_seconds,
               "video_seconds_per_wall_second": processed_seconds / wall if wall > 0 else 0.0,
               "retry_quarantined": retry_quarantined}
        if run_id:
            run.update(mlflow_run_id=run_id, tracking_uri=_public_uri(uri), experiment=config.tracking.experiment)
        with tempfile.TemporaryDirectory() as tmp:
            report_dir: Path | None = Path(tmp)
            try:
                report = _write_report(out, written, config, report_dir)
            except Exception:  # noqa: BLE001 - the dataset matters more than its report: record and go on
                log.exception("the run report could not be written; the dataset version is written without it")
                report, report_dir = [], None
                written.warnings.append("the run report could not be written (see the log)")
            if run_id:
                log_version_to_mlflow(uri, run_id, config, written, run, report_dir, retry_quarantined)
        new_manifest = commit_version(out, written, redact_config(config), manifest, duplicates, run, report)
        if run_id:
            out.delete(RUN_ID_FILE)
            finish_run(uri, run_id)
    except BaseException as err:
        if run_id:
            try:
                finish_run(uri, run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 - the original error is the one to show
                log.warning("could not mark MLflow run %s as failed", run_id)
        raise
    return new_manifest


def summary_text(manifest: dict) -> str:
    counts = manifest["versions"][-1]["counts"]
    run = manifest.get("run", {})
    if run.get("nothing_new"):
        return f"nothing new: dataset version {manifest['dataset_version']} is up to date"
    quarantined = ", ".join(f"{k}: {v}" for k, v in sorted(counts["quarantined"].items())) or "none"
    drops = ", ".join(f"{k}: {v}" for k, v in sorted(counts["drop_reasons"].items())) or "none"
    lines = [
        f"dataset version {manifest['dataset_version']}",
        f"videos read: {counts['videos']} ({counts['videos_ok']} ok, {counts.get('superseded', 0)} retried)",
        f"videos quarantined: {sum(counts['quarantined'].values())} ({quarantined})",
        f"clips found: {counts['clips']}",
        f"clips kept: {counts['clips_kept']} (dropped by filter: {drops})",
    ]
    if "video_seconds_per_wall_second" in run:
        lines.append(f"video-seconds per wall-second: {run['video_seconds_per_wall_second']:.2f} "
                     f"({run['video_seconds_processed']:.1f} s of video in {run['wall_seconds']:.1f} s)")
    for warning in manifest["versions"][-1].get("warnings", []):
        lines.append(f"WARNING: {warning}")
    if run.get("mlflow_run_id"):
        lines.append(f"MLflow run {run['mlflow_run_id']} (experiment {run['experiment']}, {run['tracking_uri']})")
    if manifest["versions"][-1].get("report"):
        lines.append(f"report: {posixpath.dirname(manifest['versions'][-1]['report'][0])}/")
    return "\n".join(lines)
