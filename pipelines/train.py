"""The train workflow: resolve the config, open (or reopen) the MLflow run, build one dataset per curriculum stage,
run the Ray Train + DeepSpeed trainer (which resumes by itself), then register the exported model."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from curation.discover import join_uri
from curation.lock import OutputLock
from curation.outputs import OutputDir
from curation.redact import redact_uri, redacted_yaml
from pipelines import tracking
from pipelines.config import ConfigError, flatten
from training.config import TrainConfig
from training.loop import TrainJob
from training.objective import DistillRound
from training.preemption import clear_stop, request_stop
from training.publish import current_model, sweep_temporary

log = logging.getLogger("reelforge.train")

STAGES_FILE = "stage-data.json"  # what each curriculum stage read (training/stage_data.StageData.summary)
SHA_TAG = "reelforge.model_sha256"  # on each registered version: the sha256 of its published files


def _absolute(uri: str) -> str:
    """Workers run in other directories: a local output must be absolute."""
    return uri if "://" in uri else str(Path(uri).resolve())


def run_train(config: TrainConfig, distill: DistillRound | None = None, step: str = "train",
              register_tags: dict[str, str] | None = None, alias: str | None = None,
              task: type | None = None) -> dict:
    """Train `config.data` into `config.output`; rerunning the same command resumes from the last checkpoint.

    `distill` makes the run a progressive-distillation round (see pipelines/distill.py); `register_tags` and
    `alias` go on the registered model version. SIGTERM saves a checkpoint at the current step and returns.
    `task`: what the loop trains (training.loop.TrainJob.task; None: the diffusion model); another task's export
    is registered by its own workflow (pipelines/train_vae.py)."""
    if not config.data or not config.output:
        raise ValueError("train needs --data (a curated dataset) and --output")
    config.validate()
    config.data, config.output = _absolute(config.data), _absolute(config.output)
    from training.latent_dataset import check_cache_matches, open_training_data

    table = open_training_data(config.data)  # a curated dataset or a latent cache; fails on a wrong --data now
    check_cache_matches(table, config, task)
    from training.latent_dataset import check_buckets_supported

    check_buckets_supported(table, config, task)
    config.data = table.data_uri  # DIR@vN: every worker reads this version, and the saved config names it
    from training.stage_data import plan_stages

    stages = plan_stages(config, table)  # each stage's data (subset, image folder): a bad one fails here
    with OutputLock(config.output):  # one run per output: its checkpoints and its MLflow run are its own
        return _train(config, table, distill, step, register_tags, alias, task, stages)


def _train(config: TrainConfig, table, distill: DistillRound | None, step: str,
           register_tags: dict[str, str] | None, alias: str | None, task: type | None = None,
           stages: list | None = None) -> dict:
    out = OutputDir(config.output)
    _check_resume(out, config, table.version, stages or [])
    out.makedirs()
    sweep_temporary(config.output)  # what a killed run left half-written; safe: this run holds the lease
    clear_stop(config.output)
    out.write_bytes_atomic("train-config.yaml", redacted_yaml(config).encode())
    out.write_bytes_atomic(STAGES_FILE, json.dumps([s.summary for s in stages or []], indent=2).encode())

    uri, run_id = tracking.output_run(config.output, config.tracking.uri, config.tracking.experiment,
                                      {"reelforge.step": step, "reelforge.data": config.data,
                                       "reelforge.data_version": table.version,
                                       "reelforge.output": config.output}, config.tracking.parent_run_id)
    client = tracking.client_for(uri)
    tracking.log_params(client, run_id, {**flatten(config), **tracking.data_params(table),
                                         **_stage_params(config, stages or [])})
    tracking.log_dataset_input(client, run_id, table, "training")
    log.info("MLflow run %s in %s; data %s (%s, %d clips)", run_id, redact_uri(uri), redact_uri(config.data),
             table.version, len(table))

    from pipelines.cluster import init_ray

    init_ray(config)
    started = time.perf_counter()
    with StopOnSigterm(config.output):
        try:
            result = _trainer(config, TrainJob(config, uri, run_id, distill, task, stages)).fit()
        except Exception:
            tracking.finish_run(uri, run_id, status="FAILED")
            raise
    wall = time.perf_counter() - started
    reached = int((result.metrics or {}).get("step", 0))
    finished = reached >= config.total_steps
    lineage = {"data": redact_uri(config.data), "data_version": table.version}  # what the weights were trained on
    version = (_register(client, run_id, config, {**lineage, **(register_tags or {})}, alias)
               if finished and task is None else None)
    tracking.finish_run(uri, run_id, status="FINISHED" if finished else "KILLED")
    summary = {"run_id": run_id, "step": reached, "total_steps": config.total_steps, "tracking_uri": uri,
               "model": join_uri(config.output, out.path("model")), "data_version": table.version,
               "registered_model": config.tracking.registered_model, "model_version": version,
               "wall_seconds": wall, "checkpoint": result.checkpoint.path if result.checkpoint else None}
    return summary


def _stage_params(config: TrainConfig, stages: list) -> dict:
    """What each stage that chose its data reads, as MLflow params: curriculum.<i>.<key>, e.g. curriculum.2.clips
    (the subset's size) and curriculum.2.where_resolved (the expression with its percentiles' values)."""
    return {f"curriculum.{index}.{key}": value for index, data in enumerate(stages)
            for key, value in data.summary.items()}


def _check_resume(out: OutputDir, config: TrainConfig, data_version: str, stages: list) -> None:
    """An output with a checkpoint is resumed; refuse, before anything starts, what cannot continue it."""
    from training.checkpoint import STATE_FILE, TrainState, resume_problems
    from training.stage_data import changed_images

    if not out.exists(STATE_FILE):
        return
    problems = resume_problems(TrainState.read(out.read_text(STATE_FILE)), config, data_version)
    if out.exists(STAGES_FILE) and not config.accept_data_change:  # an image folder is outside the dataset version
        problems += [f"{p}; pass --accept-data-change to continue on it"
                     for p in changed_images(json.loads(out.read_text(STAGES_FILE)), stages)]
    if problems:
        raise ConfigError(f"{config.output} holds a run this config cannot resume: {'; '.join(problems)} "
                          "(or train into a new --output)")


def _trainer(config: TrainConfig, job: TrainJob):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from training.loop import train_loop_per_worker

    use_gpu = config.scaling.use_gpu
    resources = {"CPU": config.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="ray-train", storage_path=config.output,
            failure_config=ray.train.FailureConfig(max_failures=config.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.checkpoint.num_to_keep)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


class StopOnSigterm:
    """While the trainer runs, SIGTERM leaves a stop request for the workers instead of killing the driver: they
    save a checkpoint at the step they are on and end, and `fit()` returns. A second SIGTERM exits at once."""

    def __init__(self, output: str):
        self.output = output
        self.previous = None
        self.requested = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise SystemExit(128 + signum)
        self.requested = True
        log.warning("SIGTERM: asking the workers to save a checkpoint at their current step and stop")
        request_stop(self.output)

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _register(client, run_id: str, config: TrainConfig, extra_tags: dict[str, str] | None = None,
              alias: str | None = None) -> str | None:
    """Register the published export (models/<sha16>, which is never overwritten) as a model version, once per run:
    a rerun after a kill between creating the version and tagging the run finds that version instead of making a
    second one."""
    run = client.get_run(run_id)
    existing = run.data.tags.get("reelforge.model_version")
    if existing:
        return existing
    out = OutputDir(config.output)
    if not out.exists("model", "config.json"):
        log.warning("no exported model under %s/model; nothing to register", config.output)
        return None
    published = current_model(config.output) or {"sha256": "", "folder": "model"}  # "model": an older export
    name = config.tracking.registered_model
    version = _registered_version(client, name, run_id, published["sha256"])
    if version is None:
        version = _create_version(client, run, config, published, extra_tags)
    else:
        log.info("%s version %s of this run was registered by an earlier, interrupted invocation", name, version)
    if alias:  # e.g. "steps-4": the newest 4-step student, whatever its version number
        client.set_registered_model_alias(name, alias, version)
    client.set_tag(run_id, "reelforge.model_version", version)
    log.info("registered %s version %s", name, version)
    return version


def _registered_version(client, name: str, run_id: str, sha256: str) -> str | None:
    """The version of `name` this run already registered for these weights, if any."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None  # no such registered model yet
    same = [v for v in found if v.tags.get(SHA_TAG, "") == sha256]
    return str(min(int(v.version) for v in same)) if same else None


def _create_version(client, run, config: TrainConfig, published: dict, extra_tags: dict[str, str] | None) -> str:
    tags = {"preset": config.model.preset, "steps": str(config.total_steps), SHA_TAG: published["sha256"],
            "sampling_steps": str(config.sampling.num_steps), "run_id": run.info.run_id,
            **{k: str(v) for k, v in (extra_tags or {}).items()}}
    _log_pyfunc(client, run.info.run_id, OutputDir(config.output), published["folder"], tags)
    source = f"{run.info.artifact_uri.rstrip('/')}/model"
    name = config.tracking.registered_model
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="reelforge text-to-video diffusion models (VDiT)")
    except MlflowException:
        pass  # it exists
    return str(client.create_model_version(name, source, run_id=run.info.run_id, tags=tags).version)


def _log_pyfunc(client, run_id: str, out: OutputDir, folder: str, tags: dict[str, str]) -> None:
    """The run's artifact `model/`: the exported folder as an MLflow pyfunc model (training/pyfunc.py: signature,
    input example, pip requirements, its code), so `models:/NAME/VERSION` loads with mlflow.pyfunc and serves with
    `mlflow models serve`. A remote output is copied here first (the registry never holds its credentials). Logging
    again after an interruption rewrites the same files."""
    import tempfile

    import pyarrow.fs as pafs

    from training.pyfunc import save_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        local = out.path(folder)
        if not out.is_local:
            local = os.path.join(tmp, "export")
            pafs.copy_files(out.path(folder), local, source_filesystem=out.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        metadata = {f"reelforge.{k}": tags[k] for k in ("data", "data_version") if k in tags}
        save_pyfunc(local, os.path.join(tmp, "pyfunc"), {**metadata, "reelforge.run_id": run_id})
        client.log_artifacts(run_id, os.path.join(tmp, "pyfunc"), "model")


def summary_text(summary: dict) -> str:
    registered = (f"registered as {summary['registered_model']} version {summary['model_version']}"
                  if summary["model_version"] else f"stopped at step {summary['step']} of {summary['total_steps']}; "
                  "rerun the same command to continue")
    return "\n".join([
        f"model: {summary['model']} ({registered})",
        f"MLflow run: {summary['run_id']} in {redact_uri(summary['tracking_uri'])}",
        f"wall time: {summary['wall_seconds']:.1f} s",
    ])
