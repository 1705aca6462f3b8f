"""The evaluate workflow: score every model with training.evaluate, write the comparison into the output, and record
one MLflow run with a nested child run per model whose metrics share their names (side by side in the MLflow UI)."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

from curation.outputs import OutputDir
from curation.redact import redact_config, redact_uri, redacted_yaml
from pipelines import tracking
from pipelines.config import flatten
from training.evaluate import (
    UNTRAINED_NOTE,
    EvaluateConfig,
    EvaluationResult,
    evaluate,
    evaluation_models,
    file_name,
    video_format,
    write_outputs,
)

log = logging.getLogger("reelforge.evaluate")

# A rerun with the same config logs into the same runs (their ids kept here); a changed config starts new ones.
RUN_ID_FILE = "mlflow_run_id"
CHILD_RUNS_FILE = "mlflow_child_runs.json"
CONFIG_FILE = "evaluate-config.yaml"
PARENT_ARTIFACTS = ("comparison.csv", "comparison.md", "grid.gif", "prompts.txt", "results.json", "samples/real.gif")


def _config_params(config: EvaluateConfig) -> dict:
    """The resolved config as MLflow params, one key per model field (models.0.path ...) rather than one long list."""
    data = redact_config(config)
    data["models"] = {str(i): spec for i, spec in enumerate(data["models"])}
    return flatten(data)


def _registered_version(client, model_path: str) -> tuple[str, str] | None:
    """(registered model, version) of the train or distill run that exported `model_path`, when that run's id sits
    beside the model (OUTPUT/mlflow_run_id) and its store is this one or the run output's own mlflow.db."""
    from mlflow.tracking import MlflowClient

    folder = Path(model_path)
    for candidate in (folder / RUN_ID_FILE, folder.parent / RUN_ID_FILE):
        if not candidate.is_file():
            continue
        run_id = candidate.read_text().strip()
        clients = [client]
        if (candidate.parent / "mlflow.db").is_file():
            clients.append(MlflowClient(tracking_uri=f"sqlite:///{(candidate.parent / 'mlflow.db').resolve()}"))
        for store in clients:
            try:
                versions = store.search_model_versions(f"run_id = '{run_id}'")
            except Exception as err:  # noqa: BLE001 - a lookup for a param, never a reason to fail the evaluation
                log.debug("no model version lookup for run %s: %s", run_id, err)
                continue
            if versions:
                newest = max(versions, key=lambda v: int(v.version))
                return newest.name, str(newest.version)
    return None


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    """MLflow shows a missing metric as blank; NaN (no real clips, nothing scorable) is left out."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)}


def _log_metrics(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()])


def _untrained_tags(result: EvaluationResult) -> dict[str, str]:
    tags = {"scores_untrained": str(bool(result.untrained_metrics)).lower(),
            "untrained_metrics": ",".join(result.untrained_metrics) or "none"}
    if result.untrained_metrics:
        tags["untrained_note"] = f"{', '.join(result.untrained_metrics)}: {UNTRAINED_NOTE}"
    return tags


def _log_models(client, uri: str, config: EvaluateConfig, parent_id: str, result: EvaluationResult,
                directory: Path, recorded: dict[str, str], opened: list[str]) -> tuple[dict[str, str], dict]:
    """One child run per model under the evaluate run: the same metric names for every model, its params, its GIF.
    Returns {model name: run id} and {model name: registered version or None}."""
    from mlflow.entities import RunTag

    children, versions = {}, {}
    for model in result.models:
        run_id = tracking.open_run(uri, config.tracking.experiment, recorded.get(model.name), run_name=model.name,
                                   tags={"reelforge.step": "evaluate", "reelforge.model": model.name,
                                         "reelforge.role": model.role}, parent_run_id=parent_id)
        opened.append(run_id)
        children[model.name] = run_id
        registered = _registered_version(client, model.path)
        versions[model.name] = registered[1] if registered else None
        params = {"path": model.path, "role": model.role, "sampler": model.sampler, "backend": model.backend,
                  "num_steps": model.num_steps,
                  "cfg_scale": model.cfg_scale, "preset": model.config.get("preset", ""),
                  "train_steps": model.config.get("steps", ""),
                  "registered_model": registered[0] if registered else "",
                  "registered_version": registered[1] if registered else "unknown"}
        for key in ("distilled_from", "round"):
            if key in model.config:
                params[key] = model.config[key]
        tracking.log_params(client, run_id, params)
        _log_metrics(client, run_id, model.metrics)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _untrained_tags(result).items()])
        client.log_artifact(run_id, str(directory / "samples" / f"{file_name(model.name)}.gif"), "samples")
        tracking.finish_run(uri, run_id)
    return children, versions


def _log_parent(client, run_id: str, config: EvaluateConfig, result: EvaluationResult, directory: Path) -> None:
    from mlflow.entities import RunTag

    fmt = result.format
    tracking.log_params(client, run_id, {"resolved.num_frames": fmt.num_frames, "resolved.size": fmt.size,
                                         "resolved.fps": fmt.fps, "resolved.num_videos": len(result.prompts),
                                         **{f"scorer.{k}": v for k, v in result.scorers.items()}})
    if result.real is not None:
        _log_metrics(client, run_id, {f"real_{k}": v for k, v in result.real.items()})
    tags = {"reelforge.models": ",".join(m.name for m in result.models), **_untrained_tags(result)}
    if result.notes:
        tags["notes"] = redact_uri(" | ".join(result.notes))[:5000]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, redacted_yaml(config), CONFIG_FILE)
    for name in PARENT_ARTIFACTS:
        if (directory / name).is_file():
            client.log_artifact(run_id, str(directory / name), os.path.dirname(name) or None)


def _pin_data(config: EvaluateConfig) -> str | None:
    """Open the held-out data (a wrong --data fails before any run opens) and name its version in `config.data`
    (DIR@vN), so the config saved beside the outputs says which clips were the real side; its data_version."""
    if not config.data:
        return None
    from training.dataset import ClipTable

    table = ClipTable.open(config.data)
    config.data = table.data_uri
    return table.version


def run_evaluate(config: EvaluateConfig) -> dict:
    """Evaluate `config.models` into `config.output` and MLflow; returns the summary (see summary_text).

    Rerunning the same config rewrites the same outputs (fixed seeds) and logs into the same MLflow runs."""
    if not config.output:
        raise ValueError("evaluate needs --output")
    config.validate()
    # a wrong model path or format, or models of different codecs, fail before any run opens
    video_format(config, evaluation_models(config)[0])
    data_version = _pin_data(config)
    started = time.perf_counter()
    out = OutputDir(config.output)
    out.makedirs()
    config_yaml = redacted_yaml(config)  # written beside the outputs: credentials in its URIs masked
    same_config = out.exists(CONFIG_FILE) and out.read_text(CONFIG_FILE) == config_yaml
    recorded = out.read_text(RUN_ID_FILE).strip() if same_config and out.exists(RUN_ID_FILE) else None
    recorded_children = json.loads(out.read_text(CHILD_RUNS_FILE)) if recorded and out.exists(CHILD_RUNS_FILE) else {}

    uri = tracking.tracking_uri(config.tracking.uri, config.output if out.is_local else "mlruns")
    run_id = tracking.open_run(uri, config.tracking.experiment, recorded,
                               run_name=Path(config.output.rstrip("/")).name or "evaluate",
                               tags={"reelforge.step": "evaluate", "reelforge.output": config.output,
                                     "reelforge.data": config.data or "none",
                                     "reelforge.data_version": data_version or "none"},
                               parent_run_id=config.tracking.parent_run_id)
    if run_id != recorded:
        recorded_children = {}
    out.write_bytes_atomic(CONFIG_FILE, config_yaml.encode())
    out.write_bytes_atomic(RUN_ID_FILE, run_id.encode())
    client = tracking.client_for(uri)
    tracking.log_params(client, run_id, _config_params(config))
    log.info("MLflow run %s in %s", run_id, redact_uri(uri))

    opened: list[str] = []
    try:
        result = evaluate(config)
        with tempfile.TemporaryDirectory() as tmp:
            directory = Path(out.root) if out.is_local else Path(tmp)
            written = write_outputs(result, directory, config.grid_prompts, config.gif_cell_px)
            if not out.is_local:
                out.makedirs("samples")
                for rel, path in written.items():
                    out.write_bytes_atomic(rel, path.read_bytes())
            children, versions = _log_models(client, uri, config, run_id, result, directory, recorded_children,
                                             opened)
            out.write_bytes_atomic(CHILD_RUNS_FILE, json.dumps(children, indent=2).encode())
            _log_parent(client, run_id, config, result, directory)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        for failed in [*opened, run_id]:
            try:
                tracking.finish_run(uri, failed, status=status)
            except Exception:  # noqa: BLE001 - the original error is the one to show
                log.warning("could not mark MLflow run %s as %s", failed, status)
        raise
    tracking.finish_run(uri, run_id)
    rows = result.rows()
    for row in rows:
        row["registered_version"] = versions[row["model"]]
        row["mlflow_run_id"] = children[row["model"]]
    return {"run_id": run_id, "tracking_uri": uri, "experiment": config.tracking.experiment,
            "output": config.output, "child_runs": children, "columns": result.columns, "models": rows,
            "real": result.real, "format": {"num_frames": result.format.num_frames, "size": result.format.size,
                                            "fps": result.format.fps},
            "num_videos": len(result.prompts), "untrained_metrics": result.untrained_metrics,
            "scorers": result.scorers, "notes": result.notes, "artifacts": sorted(written),
            "wall_seconds": time.perf_counter() - started}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


# The terminal table's columns and their short headers; comparison.md holds every column.
SUMMARY_COLUMNS = {"num_steps": "steps", "cfg_scale": "cfg", "model_evaluations_per_video": "evals/video",
                   "seconds_per_video": "s/video", "clipsim_mean": "clipsim", "flicker_mean": "flicker",
                   "motion_wasserstein": "motion_w1", "both_accuracy": "color+dir acc",
                   "background_accuracy": "bg acc"}


def summary_text(summary: dict) -> str:
    """The comparison as an aligned text table, the notes, and where the outputs and the MLflow runs are."""
    marked = set(summary["untrained_metrics"])
    frechet = [c for c in summary["columns"] if c.startswith(("frechet_", "fvd_"))]
    columns = [c for c in summary["columns"] if c in SUMMARY_COLUMNS or c in frechet]
    header = ["model", *[SUMMARY_COLUMNS.get(c, c) + ("*" if c in marked else "") for c in columns]]
    table = [header] + [[row["model"], *[_cell(row[c]) for c in columns]] for row in summary["models"]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    fmt = summary["format"]
    lines.insert(0, f"{summary['num_videos']} videos per model, {fmt['num_frames']} frames at {fmt['fps']:g} fps, "
                    f"{fmt['size']}x{fmt['size']} px")
    if marked:
        lines.append(f"* from untrained weights ({summary['scorers'].get('clip', '')}): {UNTRAINED_NOTE}")
    for note in summary["notes"]:
        lines.append(f"note: {note}")
    lines.append(f"outputs: {summary['output']} (comparison.md, comparison.csv, grid.gif, samples/)")
    lines.append(f"MLflow run: {summary['run_id']} (experiment {summary['experiment']}, "
                 f"{redact_uri(summary['tracking_uri'])}), "
                 f"one child run per model")
    lines.append(f"wall time: {summary['wall_seconds']:.1f} s")
    return "\n".join(lines)
