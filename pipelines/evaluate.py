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
    CHART_FILE,
    UNTRAINED_NOTE,
    EvaluateConfig,
    EvaluationResult,
    ModelResult,
    ResolvedModel,
    VideoFormat,
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
PARENT_ARTIFACTS = ("comparison.csv", "comparison.md", "grid.gif", CHART_FILE, "prompts.txt", "results.json",
                    "samples/real.gif")
SAMPLES_ARTIFACT = "samples.gif"  # each model's labelled samples, under one name in every model's run
# On a registered model version, what its evaluation found: eval.<metric> (the run's metric names), eval.run_id, ...
EVAL_TAGS = ("both_accuracy", "color_accuracy", "direction_accuracy", "background_accuracy", "seconds_per_video",
             "speedup_vs_teacher", "model_evaluations_per_video")


def _config_params(config: EvaluateConfig, models: list[ResolvedModel], fmt: VideoFormat) -> dict:
    """The config as it runs, as MLflow params: one key per field of every evaluated model (models.0.name ...),
    resolved (names, steps and guidance from config.json; teacher_samplings and ONNX rows included), the format
    the videos have, and the prompts only when they are the configured list (held-out captions: after the run)."""
    data = redact_config(config)
    data["models"] = {str(i): {"name": m.name, "path": m.path, "num_steps": m.num_steps, "cfg_scale": m.cfg_scale,
                               "sampler": m.sampler, "backend": m.backend, "role": m.role}
                      for i, m in enumerate(models)}
    data.pop("teacher_samplings", None)  # evaluated as models.N (with the first model's path)
    data.update(num_frames=fmt.num_frames, size=fmt.size, fps=fmt.fps)
    if config.data:
        data.pop("prompts", None)
    else:
        data["prompts"] = config.prompts[:config.max_videos]
    return flatten(data)


# Settings of each model are its run's params; metrics of the same names put them twice in the UI's plots.
SETTINGS = ("num_steps", "cfg_scale")
SAME_FOR_EVERY_MODEL = ("num_videos", "prompts_scored")  # left out of the parent's per-model metrics
HEADLINE = ("both_accuracy", "speedup_vs_teacher", "seconds_per_video")  # how good, how much faster


def mlflow_metric_name(name: str, untrained: list[str]) -> str:
    """A metric computed with untrained weights says so in its name (untrained_clipsim_mean), in every run."""
    return f"untrained_{name}" if name in untrained else name


def model_metrics(model: ModelResult, result: EvaluationResult) -> dict[str, float]:
    """A model's measurements under their MLflow names: the same names in every model's run, the headline ones
    first (the compare page's default plot takes the first metric a run logged)."""
    order = [*HEADLINE, *(k for k in model.metrics if k not in HEADLINE)]
    return {mlflow_metric_name(k, result.untrained_metrics): model.metrics[k] for k in order
            if k in model.metrics and k not in SETTINGS}


def parent_metrics(result: EvaluationResult) -> dict[str, float]:
    """Every model's measurements on one run, as <metric>/<model> (both_accuracy/student-4, speedup_vs_teacher/
    student-4): the UI lists the models side by side under each metric."""
    per_model = {model.name: model_metrics(model, result) for model in result.models}
    names = [n for n in per_model[result.models[0].name] if n not in SAME_FOR_EVERY_MODEL] if result.models else []
    return _finite({f"{name}/{model}": metrics[name] for name in names for model, metrics in per_model.items()})


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


def _lineage(client, model: ModelResult) -> tuple[dict | None, dict[str, str]]:
    """The registered version a model is (tracking.registered_version) and its lineage as run tags: its
    models:/ URI, the run that trained it, the data version it was trained on, the model it was distilled from."""
    registered = tracking.registered_version(client, model.path)
    tags = {"reelforge.model_path": model.path}
    if registered:
        version_tags = registered["tags"]
        tags.update({"reelforge.model_uri": registered["uri"], "reelforge.source_run_id": registered["run_id"]})
        for key in ("data", "data_version"):
            if version_tags.get(key):
                tags[f"reelforge.trained_on_{key}"] = version_tags[key]
    if "distilled_from" in model.config:
        teacher = str(model.config["distilled_from"])
        found = tracking.registered_version(client, teacher)
        tags.update({"reelforge.distilled_from_path": teacher,
                     "reelforge.distilled_from": found["uri"] if found else teacher})
    return registered, tags


def _tag_version(registered: dict, model: ModelResult, result: EvaluationResult, run_id: str,
                 data_version: str | None) -> None:
    """The evaluation's results on the model version itself (eval.<metric> tags), so the registry answers how good
    and how fast a version is; a later evaluation overwrites them and names its run."""
    metrics = model_metrics(model, result)
    tags = {f"eval.{mlflow_metric_name(k, result.untrained_metrics)}": f"{model.metrics[k]:.4g}" for k in EVAL_TAGS
            if k in model.metrics and math.isfinite(model.metrics[k])}
    tags.update({"eval.run_id": run_id, "eval.model_name": model.name, "eval.num_videos": str(len(result.prompts)),
                 "eval.data_version": data_version or "none (prompts)",
                 "eval.untrained_metrics": ",".join(m for m in metrics if m.startswith("untrained_")) or "none"})
    store = registered["client"]
    for key, value in tags.items():
        store.set_model_version_tag(registered["name"], registered["version"], key, value)


def _log_models(client, uri: str, config: EvaluateConfig, parent_id: str, result: EvaluationResult,
                directory: Path, recorded: dict[str, str], opened: list[str],
                data_version: str | None) -> tuple[dict[str, str], dict]:
    """One child run per model under the evaluate run, lasting as long as that model's generation and scoring: the
    same metric names for every model, its params, its lineage as tags, its labelled samples as samples.gif.
    Returns {model name: run id} and {model name: its registered version (tracking.registered_version) or None}."""
    import shutil

    from mlflow.entities import RunTag

    children, versions = {}, {}
    for model in result.models:
        run_id = tracking.open_run(uri, config.tracking.experiment, recorded.get(model.name), run_name=model.name,
                                   tags={"reelforge.step": "evaluate", "reelforge.model": model.name,
                                         "reelforge.role": model.role}, parent_run_id=parent_id,
                                   start_time=int(model.started_at * 1000) or None)
        opened.append(run_id)
        children[model.name] = run_id
        registered, lineage = _lineage(client, model)
        versions[model.name] = registered
        # its folder is the tag reelforge.model_path (and the evaluate run's models.N.path): a file path as a
        # param is an axis of the compare page's default plot that tells a user nothing
        params = {"role": model.role, "sampler": model.sampler, "backend": model.backend,
                  "num_steps": model.num_steps,
                  "cfg_scale": model.cfg_scale, "preset": model.config.get("preset", ""),
                  "train_steps": model.config.get("steps", ""),
                  "registered_model": registered["name"] if registered else "",
                  "registered_version": registered["version"] if registered else "unknown"}
        if "round" in model.config:
            params["round"] = model.config["round"]
        tracking.log_params(client, run_id, params)
        _log_metrics(client, run_id, model_metrics(model, result))
        tags = {**_untrained_tags(result), **lineage}
        client.log_batch(run_id, tags=[RunTag(k, redact_uri(str(v))[:5000]) for k, v in tags.items()])
        with tempfile.TemporaryDirectory() as tmp:  # one artifact name in every model's run
            sheet = Path(tmp) / SAMPLES_ARTIFACT
            shutil.copyfile(directory / "samples" / f"{file_name(model.name)}.gif", sheet)
            client.log_artifact(run_id, str(sheet))
        if registered:
            _tag_version(registered, model, result, run_id, data_version)
        tracking.finish_run(uri, run_id, end_time=int(model.finished_at * 1000) or None)
    return children, versions


def _log_parent(client, run_id: str, config: EvaluateConfig, result: EvaluationResult, directory: Path) -> None:
    from mlflow.entities import RunTag

    params = {"num_videos": len(result.prompts), **{f"scorer.{k}": v for k, v in result.scorers.items()}}
    if config.data:
        params["prompts"] = f"the captions of {len(result.prompts)} held-out clips of {config.data} (prompts.txt)"
    tracking.log_params(client, run_id, params)
    metrics = parent_metrics(result)
    if result.real is not None:
        metrics.update({f"real_{mlflow_metric_name(k, result.untrained_metrics)}": v for k, v in result.real.items()})
    _log_metrics(client, run_id, metrics)
    tags = {"reelforge.models": ",".join(m.name for m in result.models), **_untrained_tags(result)}
    if result.notes:
        tags["notes"] = redact_uri(" | ".join(result.notes))[:5000]
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    client.log_text(run_id, redacted_yaml(config), CONFIG_FILE)
    for name in PARENT_ARTIFACTS:
        if (directory / name).is_file():
            client.log_artifact(run_id, str(directory / name), os.path.dirname(name) or None)


def _pin_data(config: EvaluateConfig):
    """Open the held-out data (a wrong --data fails before any run opens) and name its version in `config.data`
    (DIR@vN), so the config saved beside the outputs says which clips were the real side; its ClipTable."""
    if not config.data:
        return None
    from training.dataset import ClipTable

    table = ClipTable.open(config.data)
    config.data = table.data_uri
    return table


def run_evaluate(config: EvaluateConfig) -> dict:
    """Evaluate `config.models` into `config.output` and MLflow; returns the summary (see summary_text).

    Rerunning the same config rewrites the same outputs (fixed seeds) and logs into the same MLflow runs."""
    if not config.output:
        raise ValueError("evaluate needs --output")
    config.validate()
    # a wrong model path or format, or models of different codecs, fail before any run opens
    models = evaluation_models(config)
    fmt = video_format(config, models[0])
    table = _pin_data(config)
    data_version = table.version if table is not None else None
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
    tracking.log_params(client, run_id, _config_params(config, models, fmt))
    if table is not None:
        tracking.log_dataset_input(client, run_id, table, "evaluation")
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
                                             opened, data_version)
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
        registered = versions[row["model"]]
        row["registered_version"] = registered["version"] if registered else None
        row["model_uri"] = registered["uri"] if registered else None
        row["mlflow_run_id"] = children[row["model"]]
    return {"run_id": run_id, "tracking_uri": uri, "experiment": config.tracking.experiment,
            "output": config.output, "child_runs": children, "columns": result.columns, "models": rows,
            "real": result.real, "format": {"num_frames": result.format.num_frames, "size": result.format.size,
                                            "fps": result.format.fps},
            "num_videos": len(result.prompts), "untrained_metrics": result.untrained_metrics,
            "scorers": result.scorers, "notes": result.notes, "artifacts": sorted(written),
            "mlflow_metrics": parent_metrics(result), "data_version": data_version,
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
