"""The curate workflow: discover, skip what is done, run the Ray Data plan, filter and finalize a new dataset version,
write its report, and record it all as one MLflow run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from curation import schema
from curation.config import CurateConfig
from curation.dataset import CuratedDataset, DatasetError, version_tag
from curation.dedup import index_hashes
from curation.discover import list_videos
from curation.filters import ClipFilter
from curation.lock import CurateLock
from curation.outputs import OutputDir
from curation.redact import redact_config, redact_uri, redacted_yaml
from curation.video_stage import REPEATED, quarantined_row, run_error_video
from curation.writer import (
    BatchCommitter,
    VersionWrite,
    create_tables,
    finish_filters,
    index_embeddings,
    tag_version,
    verdicts_committed,
    video_status,
)
from pipelines.cluster import init_ray
from pipelines.config import flatten
from pipelines.tracking import (
    client_for,
    close_dangling,
    finish_run,
    log_dataset_input,
    log_params,
    open_run,
    tracking_uri,
)

log = logging.getLogger("reelforge.curate")

REPORTS = "reports"
# The videos table's config keeps the MLflow run of the version being made: a run interrupted before its tag is
# resumed by the next invocation (same version number); the tag's record names it once the version exists.
RUN_KEY = "reelforge.mlflow_run.{tag}"
# ... and the hash of the config that started it: a rerun under another config must not finish it (a silent mix).
CONFIG_KEY = "reelforge.config_sha256.{tag}"


class ConfigDrift(ValueError):
    """A rerun's config differs from the one that started the unfinished version it would finish."""


# What may change between the runs that make one version: where things are and how they are run, not what the
# data becomes (a resumed run joins another cluster, or gives the models a GPU).
RUN_ONLY = ("input", "output", "tracking", "report", "output_files", "ray")
RESOURCES = ("batch_size", "videos_per_batch", "device", "num_cpus", "num_gpus", "concurrency")


def config_sha256(config: CurateConfig) -> str:
    """The hash of the settings that decide the data (secrets masked): every section but RUN_ONLY, and the model
    stages without their RESOURCES."""
    settings = {k: v for k, v in redact_config(config).items() if k not in RUN_ONLY}
    for stage in ("captions", "clip_scores", "ocr"):
        settings[stage] = {k: v for k, v in settings[stage].items() if k not in RESOURCES}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def _claim_version(config: CurateConfig, dataset: CuratedDataset, version: int) -> None:
    """Record which config makes `version`, or refuse when an interrupted run started it under another one."""
    tag = version_tag(version)
    key, digest = CONFIG_KEY.format(tag=tag), config_sha256(config)
    started = dataset.open("videos").config().get(key)
    if started is None:
        OutputDir(config.output).write_bytes_atomic(f"config-{tag}.yaml", redacted_yaml(config).encode())
        dataset.open("videos").update_config({key: digest})
    elif started != digest:
        raise ConfigDrift(f"dataset version {version} of {redact_uri(config.output)} was started by a run with "
                          f"another config (sha256 {started[:12]}, saved as config-{tag}.yaml; this one is "
                          f"{digest[:12]}): rerun with that config to finish it, then curate with the new one")


def _warn_if_config_changed(config: CurateConfig, record: dict) -> None:
    if record.get("config_sha256") and record["config_sha256"] != config_sha256(config):
        log.warning("the config differs from the one that made dataset version %d: videos already curated are not "
                    "curated again (curate into a new output to apply it to every video)", record["dataset_version"])


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


def curate_run_name(output: str, version: int) -> str:
    """curate-<output folder>-v0001: the training data's and the held-out data's runs of one workflow differ."""
    name = redact_uri(output).rstrip("/").rsplit("/", 1)[-1] or "output"
    return f"curate-{name}-v{version:04d}"


def _start_run(uri: str, config: CurateConfig, dataset: CuratedDataset, version: int) -> str:
    """Reopen the MLflow run of an interrupted invocation of this version (kept in the videos table's config, which
    may be remote), else open a new one."""
    key = RUN_KEY.format(tag=version_tag(version))
    previous = dataset.open("videos").config().get(key)
    run_id = open_run(uri, config.tracking.experiment, previous, run_name=curate_run_name(config.output, version),
                      tags={"reelforge.step": "curate", "reelforge.output": redact_uri(config.output)},
                      parent_run_id=config.tracking.parent_run_id)
    if run_id == previous:
        log.info("resuming MLflow run %s of the interrupted run", run_id)
    else:
        dataset.open("videos").update_config({key: run_id})
    return run_id


def _log_curated_input(uri: str, run_id: str, output: str, version: int) -> None:
    """The version this run made, as the run's MLflow dataset (context "curated") with the fingerprint that the
    train, distill and evaluate runs reading it record as their input's digest, and as a reelforge.data_version tag."""
    from training.clip_table import ClipTable, pin_version

    try:
        table = ClipTable.open(pin_version(output, version))
    except DatasetError:  # no kept clips: nothing a later run can read
        return
    client = client_for(uri)
    log_dataset_input(client, run_id, table, "curated")
    client.set_tag(run_id, "reelforge.data_version", table.version)


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


@dataclass
class RunPlan:
    """What one invocation does: the version it makes (new, or an interrupted one it finishes) and its videos."""

    version: int
    pending: list[dict]  # discovered videos to process: not committed yet, or quarantined and retried
    duplicates: dict[str, str]  # uri -> video_id of a file whose content another listed file already has
    unfinished: bool  # the version already has committed rows from an interrupted run


def _discover(config: CurateConfig) -> tuple[dict[str, dict], dict[str, str]]:
    """video_id -> the first file (by URI) holding that content, and the duplicates."""
    from curation.plan import discover_ids

    files = list_videos(config.input, config.discover)
    log.info("found %d video files under %s", len(files), redact_uri(config.input))
    by_id: dict[str, dict] = {}
    duplicates: dict[str, str] = {}
    for row in sorted(discover_ids(files, config), key=lambda r: r["uri"]):
        if row["video_id"] in by_id:
            duplicates[row["uri"]] = row["video_id"]
        else:
            by_id[row["video_id"]] = row
    return by_id, duplicates


def _plan_run(config: CurateConfig, dataset: CuratedDataset, retry_quarantined: bool) -> RunPlan:
    latest = dataset.latest() or 0
    version = latest + 1
    status = video_status(dataset)
    by_id, duplicates = _discover(config)
    unfinished = any(n == version for _, n in status.values())
    retry = {v for v, (s, n) in status.items() if s == "quarantined" and n <= latest} if retry_quarantined else set()
    pending = [row for vid, row in sorted(by_id.items()) if vid not in status or vid in retry]
    log.info("%d new videos to process (%d already committed, %d of them by an interrupted run, %d duplicates, "
             "%d quarantined retried)", len(pending), len(set(status) & set(by_id)),
             sum(n == version for _, n in status.values()), len(duplicates),
             len(retry & {r["video_id"] for r in pending}))
    return RunPlan(version, pending, duplicates, unfinished)


def _process(plan: RunPlan, config: CurateConfig, dataset: CuratedDataset, lock: CurateLock) -> dict:
    """Run the Ray Data plan over the pending videos, committing finished ones in batches."""
    from curation.plan import curate_plan

    committer = BatchCommitter(dataset, plan.version, config.output_files.commit_videos)
    seconds, done, last_log = 0.0, 0, time.monotonic()
    errors = RunErrors(dataset, config.output_files.max_run_errors)
    pending = errors.quarantine_poison(plan.pending, committer)
    if pending:
        # An iterator of our own, closed on the way out: a failed run's traceback holds the loop's frame, and with it
        # a suspended iterator whose Ray Data executor (its actors, its share of the cluster) would outlive the run
        batches = iter(curate_plan(pending, config).iter_batches(batch_size=1, batch_format="pyarrow"))
        try:
            for batch in batches:
                lock.check()
                for record in batch.to_pylist():
                    committer.add(record)
                    seconds += record.get("duration_s") or 0.0
                    done += 1
                if time.monotonic() - last_log > 30 or done == len(pending):
                    log.info("processed %d/%d videos (%.0f s of video), %d committed", done, len(pending),
                             seconds, committer.committed)
                    last_log = time.monotonic()
        except Exception as err:
            errors.count(err)
            raise
        finally:
            _close(batches)
    lock.check()
    committer.flush()
    errors.forget(plan.pending)
    return {"videos_processed": done, "video_seconds_processed": seconds}


def _close(iterator) -> None:
    """Stop a Ray Data batch iterator now (its generator's cleanup shuts the executor down)."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class RunErrors:
    """How many runs failed on each video with a run error, kept in the videos table's config (which survives the
    failed run). At `limit` the video is quarantined as `repeated_run_error` before the plan starts: one poison file
    cannot fail every rerun forever, and a passing problem (a full disk) costs a video nothing below the limit."""

    PREFIX = "reelforge.run_errors."

    def __init__(self, dataset: CuratedDataset, limit: int):
        self.dataset, self.limit = dataset, limit

    def _recorded(self) -> dict[str, dict]:
        config = self.dataset.open("videos").config()
        return {k.removeprefix(self.PREFIX): json.loads(v) for k, v in config.items() if k.startswith(self.PREFIX)}

    def count(self, err: BaseException) -> None:
        found = run_error_video(err)
        if not found:
            return
        video, line = found
        try:
            entry = self._recorded().get(video, {"runs": 0})
            entry = {"runs": entry["runs"] + 1, "last": redact_uri(line)}
            self.dataset.open("videos").update_config({self.PREFIX + video: json.dumps(entry)})
        except Exception:  # noqa: BLE001 - e.g. the disk is full too: the run's own error is the one to raise
            log.warning("could not count the run error of video %s", video, exc_info=True)
            return
        log.error("video %s failed this run with a run error (%d of %d runs before it is quarantined)", video,
                  entry["runs"], self.limit)

    def quarantine_poison(self, pending: list[dict], committer: BatchCommitter) -> list[dict]:
        """Commit the videos that reached the limit as quarantined; returns the others."""
        recorded = self._recorded() if self.limit else {}
        keep = []
        for row in pending:
            entry = recorded.get(row["video_id"])
            if entry is None or entry["runs"] < self.limit:
                keep.append(row)
                continue
            message = (f"{entry['runs']} runs failed on this video with a run error (last: {entry['last']}); "
                       "quarantined so that it stops failing every run (curate --retry-quarantined tries it again)")
            log.warning("%s: %s", redact_uri(row["uri"]), message)
            committer.add(quarantined_row(row["video_id"], row["uri"], int(row["size_bytes"]), REPEATED, message))
        return keep

    def forget(self, videos: list[dict]) -> None:
        """The counts of videos now committed (processed, or quarantined here)."""
        keys = [self.PREFIX + row["video_id"] for row in videos]
        present = set(self.dataset.open("videos").config())
        if any(key in present for key in keys):
            self.dataset.open("videos").delete_config_keys([k for k in keys if k in present])


def _retried(dataset: CuratedDataset, version: int) -> list[str]:
    """Videos of `version` that an earlier version holds (quarantined then, retried now)."""
    if version == 1:
        return []
    ids = dataset.open("videos").to_table(columns=["video_id"], filter=f"dataset_version = {version}")
    before = set(dataset.read("videos", version - 1, columns=["video_id"])["video_id"].to_pylist())
    return sorted(set(ids["video_id"].to_pylist()) & before)


def _record(config: CurateConfig, dataset: CuratedDataset, written: VersionWrite, run: dict, report: list[str],
            duplicates: dict[str, str]) -> dict:
    """The version's record, kept in its tags' metadata: what the manifest of reelforge 0.1 held per version."""
    previous = dataset.record(written.version - 1).get("duplicates", {}) if written.version > 1 else {}
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "dataset_version": written.version,
        "config": redact_config(config),
        "config_sha256": config_sha256(config),
        "config_file": f"config-{version_tag(written.version)}.yaml",
        # How the shards' clips are stored (also in `config`): what training and exports decode.
        "encode": redact_config(config)["encode"],
        "counts": written.counts,
        "filters": written.bounds,
        "scores_untrained": written.untrained,
        "warnings": written.warnings,
        "retried": written.retried,
        "run": run,
        "report": report,
        "duplicates": {**previous, **{redact_uri(uri): video_id for uri, video_id in duplicates.items()}},
    }


def _finish(config: CurateConfig, dataset: CuratedDataset, plan: RunPlan, run: dict, run_id: str | None,
            uri: str | None, retry_quarantined: bool) -> dict:
    """Filters, report, MLflow, tags: the version exists for readers once this returns."""
    written = finish_filters(dataset, config, plan.version, _retried(dataset, plan.version))
    problem = index_embeddings(dataset, plan.version)
    if problem:
        written.warnings.append(problem)
    index_hashes(dataset, plan.version)  # the kept clips' frame hashes, for the next versions' dedup
    for warning in written.warnings:
        log.warning("!!! %s", warning)
    out = OutputDir(config.output)
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
    record = tag_version(dataset, plan.version, _record(config, dataset, written, run, report, plan.duplicates))
    tag = version_tag(plan.version)
    dataset.open("videos").delete_config_keys([RUN_KEY.format(tag=tag), CONFIG_KEY.format(tag=tag)])
    return record


def run_curate(config: CurateConfig, retry_quarantined: bool = False) -> dict:
    """Curate `config.input` into `config.output`; returns the new version's record. Safe to rerun after any
    interruption: an interrupted version is finished by the next run, with the videos it had not committed.

    Only videos not seen before (by video_id) are processed, plus, with `retry_quarantined`, those whose latest row
    is quarantined; they become the next dataset version."""
    if not config.input or not config.output:
        raise ValueError("curate needs --input and --output")
    ClipFilter(config.filters)  # a bad filter setting fails before any work
    check_weights(config)
    started = time.perf_counter()
    dataset = CuratedDataset(config.output)
    if not dataset.exists() and dataset.has_legacy_manifest():
        raise DatasetError(f"{dataset.shown} holds a dataset in the Parquet layout of reelforge 0.1 (manifest.json): "
                           f"migrate it once with `reelforge migrate-dataset --data {dataset.shown}`, then curate")
    create_tables(dataset)
    with CurateLock(dataset, config.output_files.lock_timeout_s) as lock:
        OutputDir(config.output).sweep_temporary("")  # half-written files of a killed run
        OutputDir(config.output).sweep_temporary(REPORTS, recursive=True)
        _close_dangling_run(config, dataset)
        init_ray(config)
        plan = _plan_run(config, dataset, retry_quarantined)
        latest = dataset.latest()
        if not plan.pending and not plan.unfinished and latest is not None:
            log.info("nothing new: dataset version %d is up to date", latest)
            _warn_if_config_changed(config, dataset.record(latest))
            return {**dataset.record(latest), "run": {"nothing_new": True}}
        if plan.unfinished and plan.pending and verdicts_committed(dataset, plan.version):
            # The interrupted run had judged its version: it is finished as judged (percentiles over its own
            # clips), and the videos that are new since go into the next version.
            log.info("finishing dataset version %d as the interrupted run judged it; %d new videos go into "
                     "version %d", plan.version, len(plan.pending), plan.version + 1)
            _make_version(config, dataset, lock, RunPlan(plan.version, [], plan.duplicates, True), retry_quarantined)
            plan = RunPlan(plan.version + 1, plan.pending, plan.duplicates, False)
            started = time.perf_counter()
        return _make_version(config, dataset, lock, plan, retry_quarantined, started)


def _close_dangling_run(config: CurateConfig, dataset: CuratedDataset) -> None:
    """The newest version's MLflow run, if the run that tagged the version was killed before closing it."""
    latest = dataset.latest()
    run_id = (dataset.record(latest).get("run") or {}).get("mlflow_run_id") if latest else None
    uri = curate_tracking_uri(config, OutputDir(config.output)) if run_id else None
    if uri:
        close_dangling(uri, run_id, f"the run that made dataset version {latest} stopped after tagging it, before "
                       "closing this run; the version is complete")


def _make_version(config: CurateConfig, dataset: CuratedDataset, lock: CurateLock, plan: RunPlan,
                  retry_quarantined: bool, started: float | None = None) -> dict:
    """Process the plan's videos into its version and finish it, as one MLflow run."""
    started = time.perf_counter() if started is None else started
    _claim_version(config, dataset, plan.version)
    uri = curate_tracking_uri(config, OutputDir(config.output))
    run_id = _start_run(uri, config, dataset, plan.version) if uri else None
    try:
        run = _process(plan, config, dataset, lock)
        wall = time.perf_counter() - started
        run.update(wall_seconds=wall, retry_quarantined=retry_quarantined,
                   video_seconds_per_wall_second=run["video_seconds_processed"] / wall if wall > 0 else 0.0)
        if run_id:
            run.update(mlflow_run_id=run_id, tracking_uri=_public_uri(uri), experiment=config.tracking.experiment)
        record = _finish(config, dataset, plan, run, run_id, uri, retry_quarantined)
        if run_id:
            _log_curated_input(uri, run_id, config.output, plan.version)
            finish_run(uri, run_id)
    except BaseException as err:
        if run_id:
            try:
                finish_run(uri, run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            except Exception:  # noqa: BLE001 - the original error is the one to show
                log.warning("could not mark MLflow run %s as failed", run_id)
        raise
    return record


def summary_text(record: dict) -> str:
    """A finished version's record (or a no-op run's) as the lines `reelforge curate` prints."""
    counts = record["counts"]
    run = record.get("run", {})
    if run.get("nothing_new"):
        return f"nothing new: dataset version {record['dataset_version']} is up to date"
    quarantined = ", ".join(f"{k}: {v}" for k, v in sorted(counts["quarantined"].items())) or "none"
    drops = ", ".join(f"{k}: {v}" for k, v in sorted(counts["drop_reasons"].items())) or "none"
    lines = [
        f"dataset version {record['dataset_version']}",
        f"videos read: {counts['videos']} ({counts['videos_ok']} ok, {counts.get('superseded', 0)} retried)",
        f"videos quarantined: {sum(counts['quarantined'].values())} ({quarantined})",
        f"clips found: {counts['clips']}",
        f"clips kept: {counts['clips_kept']} (dropped by filter: {drops})",
    ]
    if record.get("encode"):
        encode = record["encode"]
        rate = f"~{encode['fps']:g} fps" if encode.get("fps") else "every frame"
        lines.append(f"shard clips: {rate}, short side {encode['short_side']} px, {encode['codec']} "
                     f"crf {encode['crf']}")
    if "video_seconds_per_wall_second" in run:
        lines.append(f"video-seconds per wall-second: {run['video_seconds_per_wall_second']:.2f} "
                     f"({run['video_seconds_processed']:.1f} s of video in {run['wall_seconds']:.1f} s)")
    for warning in record.get("warnings", []):
        lines.append(f"WARNING: {warning}")
    if run.get("mlflow_run_id"):
        lines.append(f"MLflow run {run['mlflow_run_id']} (experiment {run['experiment']}, {run['tracking_uri']})")
    if record.get("report"):
        lines.append(f"report: {posixpath.dirname(record['report'][0])}/")
    return "\n".join(lines)
