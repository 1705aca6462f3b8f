"""What the workflow's parent run records of each finished step, so the one run a user opens answers which data, which
models and which is best: the step runs' ids and the models' `models:/` URIs as tags, the curated version as an MLflow
dataset input, every model's evaluation metrics (<metric>/<model>) and the speed-vs-quality chart."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from curation.redact import redact_uri
from pipelines import tracking

log = logging.getLogger("reelforge.run")

PARENT_ARTIFACTS = ("speed_vs_quality.png", "grid.gif", "comparison.md")  # of the evaluate step, on the parent


def step_tags(name: str, summary: dict) -> dict[str, str]:
    """Lineage tags of one step's summary (as the workflow keeps it): its run, what it made."""
    tags = {}
    if summary.get("run_id"):
        tags[f"reelforge.{name}.run_id"] = summary["run_id"]
    if summary.get("registered_model") and summary.get("model_version"):
        tags[f"reelforge.{name}.model_uri"] = tracking.model_uri(summary["registered_model"], summary["model_version"])
    if summary.get("data_version"):
        tags[f"reelforge.{name}.data_version"] = summary["data_version"]
    rounds = [r for r in summary.get("rounds") or [] if r.get("finished") and r.get("model_version")]
    if rounds:
        tags[f"reelforge.{name}.model_uris"] = ",".join(
            tracking.model_uri(r["registered_model"], r["model_version"]) for r in rounds)
    models = [m for m in summary.get("models") or [] if isinstance(m, dict) and m.get("model_uri")]
    if models:
        tags[f"reelforge.{name}.model_uris"] = ",".join(f"{m['model']}={m['model_uri']}" for m in models)
    return tags


def step_metrics(name: str, summary: dict) -> dict[str, float]:
    """The evaluation's per-model metrics as the evaluate run has them (<metric>/<model>), and each step's wall
    time (wall_seconds/<step>)."""
    metrics = dict(summary.get("mlflow_metrics") or {})
    if isinstance(summary.get("wall_seconds"), int | float):
        metrics[f"wall_seconds/{name}"] = summary["wall_seconds"]
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def _curated_table(summary: dict):
    """The curate step's version as a ClipTable, None when it has no kept clips or cannot be read."""
    from curation.dataset import DatasetError
    from training.dataset import ClipTable, pin_version

    try:
        return ClipTable.open(pin_version(summary["output"], int(summary["dataset_version"])))
    except (DatasetError, KeyError, TypeError, ValueError, OSError) as err:
        log.debug("no curated version to record: %s", err)
        return None


def _curate_run_id(summary: dict) -> str | None:
    from curation.dataset import CuratedDataset, DatasetError

    try:
        record = CuratedDataset(summary["output"]).record(int(summary["dataset_version"]))
    except (DatasetError, KeyError, TypeError, ValueError, OSError):
        return None
    return (record.get("run") or {}).get("mlflow_run_id")


def record_step(client, parent_run_id: str, name: str, summary: dict) -> None:
    """Log what `summary` (a step's summary in the workflow) says onto the parent run. Bookkeeping: a failure is a
    warning, never a failed workflow."""
    try:
        _record(client, parent_run_id, name, summary)
    except Exception as err:  # noqa: BLE001 - the step's own run has everything; the parent is a summary of it
        log.warning("the parent run %s did not get step %s's lineage: %s", parent_run_id, name, redact_uri(str(err)))


def _record(client, parent_run_id: str, name: str, summary: dict) -> None:
    from mlflow.entities import Metric, RunTag

    tags = step_tags(name, summary)
    if name == "curate":
        table = _curated_table(summary)
        if table is not None:
            tracking.log_dataset_input(client, parent_run_id, table, "training")
            tags["reelforge.data_version"] = table.version
        run_id = _curate_run_id(summary)
        if run_id:
            tags["reelforge.curate.run_id"] = run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in step_metrics(name, summary).items()]
    for start in range(0, len(metrics), 500):
        client.log_batch(parent_run_id, metrics=metrics[start:start + 500])
    client.log_batch(parent_run_id, tags=[RunTag(k, redact_uri(str(v))[:5000]) for k, v in tags.items()])
    output = summary.get("output")
    if name == "evaluate" and output and "://" not in output:
        for artifact in PARENT_ARTIFACTS:
            if (Path(output) / artifact).is_file():
                client.log_artifact(parent_run_id, str(Path(output) / artifact), "evaluate")
