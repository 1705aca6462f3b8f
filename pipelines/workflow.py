"""The whole workflow as one command: (a sample dump when no input is given) -> curate -> train -> distill ->
evaluate, as one MLflow parent run with a nested run per step. The latent workflow adds two steps after curate:
train-vae (the causal video VAE on the curated clips) and encode (the clips through it into a latent cache, which
train and distill then read); `configs/quickstart-latent.yaml` runs it on the sample dump.

Each step is the function its own subcommand runs. The workflow records, per step, a hash of the step's resolved
config and of everything upstream of it (`WORKDIR/workflow.json`); a rerun skips a step whose outputs exist with the
same hash and resumes the first unfinished one (curation processes only new videos, training and distillation resume
from their last checkpoint). A step whose config changed starts afresh; its old outputs are moved aside, not deleted.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

from curation.redact import redact_config, redact_uri
from models.codec import CodecConfig
from pipelines import lineage, tracking
from pipelines.config import ConfigError
from pipelines.fingerprints import (  # noqa: F401  (callers and tests import them from here)
    codec_fingerprint,
    config_hash,
    data_fingerprint,
    input_fingerprint,
    model_fingerprint,
)
from pipelines.workflow_config import PIXEL_STEPS, SampleDumpConfig, WorkflowConfig  # noqa: F401
from pipelines.workflow_steps import STEPS as STEP_RUNNERS
from pipelines.workflow_steps import VAE_INFO, Plan, has_finished_version, step_paths  # noqa: F401
from training.latent_encode import EncodeConfig

log = logging.getLogger("reelforge.run")

STEPS = tuple(step.name for step in STEP_RUNNERS)  # curate, train-vae, encode, train, distill, evaluate: run order
STATE_FILE = "workflow.json"


class _State:
    """WORKDIR/workflow.json: the parent run and, per step, its hash, status, outputs and MLflow run."""

    def __init__(self, workdir: Path):
        self.path = workdir / STATE_FILE
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {"steps": {}}

    def save(self) -> None:
        """Whole or not at all: a temporary file of this process's own, flushed to disk, then renamed over."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        # Step summaries carry URIs (tracking stores, inputs): the file gets them without their credentials.
        with open(tmp, "w") as f:
            f.write(json.dumps(redact_config(self.data), indent=2, sort_keys=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def step(self, name: str) -> dict:
        return self.data["steps"].get(name, {})

    def update(self, name: str, **values) -> None:
        self.data["steps"].setdefault(name, {}).update(values)
        self.save()


def _set_aside(directory: Path, old_hash: str, uri: str | None = None) -> None:
    """A step whose config or inputs changed starts in a clean folder; the old outputs stay beside it, and the MLflow
    run they kept, if a killed run left it RUNNING, is closed (nothing will continue it)."""
    if directory.exists():
        target = directory.with_name(f"{directory.name}.stale-{old_hash[:8]}")
        suffix = 1
        while target.exists():
            target = directory.with_name(f"{directory.name}.stale-{old_hash[:8]}-{suffix}")
            suffix += 1
        directory.rename(target)
        log.warning("the %s config or inputs changed since its last run: its old outputs moved to %s",
                    directory.name, target)
        run_file = target / tracking.RUN_ID_FILE
        if uri and run_file.is_file():
            tracking.close_dangling(uri, run_file.read_text().strip(),
                                    f"superseded: the step's config or inputs changed; its outputs are in {target}")


def _generated_dump(directory: Path, num_videos: int, seed: int, shape_size: float) -> str:
    from curation.sample_dump import make_sample_dump

    if not (directory / "sample_truth.json").exists():
        make_sample_dump(directory, num_videos=num_videos, seed=seed, shape_size=shape_size)
        log.info("generated a sample dump of %d videos in %s", num_videos, directory)
    return str(directory)


class StepRunner:
    """Runs the workflow's steps under its parent MLflow run, one at a time: a step whose recorded hash (its config
    section and its inputs) matches and whose outputs exist is skipped; otherwise it runs (a non-resumable step whose
    hash changed first has its old outputs set aside) and its status, hash, summary and lineage are recorded."""

    def __init__(self, state: _State, uri: str, parent: str):
        self.state, self.uri, self.parent = state, uri, parent
        self.client = tracking.client_for(uri)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        self.summaries: dict[str, dict | None] = {}

    def run(self, step, plan: Plan) -> None:
        digest = config_hash(step.section(plan), [], step.inputs(plan))
        recorded = self.state.step(step.name)
        if recorded.get("status") == "finished" and recorded.get("hash") == digest and step.done(plan):
            log.info("step %s: up to date (config hash %s), skipped", step.name, digest[:12])
            self.skipped.append(step.name)
            self.summaries[step.name] = recorded.get("summary")
            return
        if recorded.get("hash") and recorded["hash"] != digest and not step.resumable:
            _set_aside(plan.paths[step.name], recorded["hash"], self.uri)
        self._mark(step.name, "running", hash=digest, started=time.time())
        log.info("step %s: running (config hash %s)", step.name, digest[:12])
        try:
            summary = step.run(plan)
        except BaseException:
            self._mark(step.name, "failed")
            raise
        summary = json.loads(json.dumps(summary, default=str))
        status = "finished" if summary.get("finished", True) else "stopped"
        self._mark(step.name, status, finished=time.time(), summary=summary)
        self.client.set_tag(self.parent, f"reelforge.{step.name}.hash", digest)
        lineage.record_step(self.client, self.parent, step.name, summary)  # run ids, models:/ URIs, data, metrics
        self.ran.append(step.name)
        self.summaries[step.name] = summary
        if status != "finished":
            raise _Stopped(step.name)

    def _mark(self, name: str, status: str, **values) -> None:
        """The step's status, in workflow.json and as a tag on the parent run."""
        self.state.update(name, status=status, **values)
        self.client.set_tag(self.parent, f"reelforge.{name}.status", status)


def run_workflow(config: WorkflowConfig) -> dict:
    unknown = [s for s in config.steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"steps: unknown step {unknown[0]!r} (known: {', '.join(STEPS)})")
    _validate_steps(config)
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    uri = tracking.tracking_uri(config.tracking_uri, workdir)
    state = _State(workdir)
    parent = _open_parent_run(config, state, uri, workdir)
    plan = Plan(config, step_paths(workdir), *_dumps(config, workdir))
    _hand_down(config, uri, parent)
    _hand_down_codec(config, plan.paths)
    runner = StepRunner(state, uri, parent)
    results: dict = {"workdir": str(workdir), "tracking_uri": uri, "run_id": parent, "ran": runner.ran,
                     "skipped": runner.skipped}
    try:
        for step in STEP_RUNNERS:
            if step.name in config.steps:
                step.prepare(plan)
                runner.run(step, plan)
    except _Stopped as stopped:
        log.warning("step %s stopped before its end; rerun the same command to continue", stopped.step)
        tracking.finish_run(uri, parent, status="KILLED")
        return {**results, **runner.summaries, "stopped": stopped.step}
    except BaseException:
        tracking.finish_run(uri, parent, status="FAILED")
        raise
    tracking.finish_run(uri, parent)
    return {**results, **runner.summaries}


def _open_parent_run(config: WorkflowConfig, state: _State, uri: str, workdir: Path) -> str:
    """The workflow's parent MLflow run: the one workflow.json records (a rerun continues it), else a new one."""
    parent = tracking.open_run(uri, config.experiment, state.data.get("run_id"), run_name=workdir.name,
                               tags={"reelforge.step": "workflow", "reelforge.workdir": str(workdir)})
    if parent != state.data.get("run_id"):
        state.data["run_id"] = parent
        state.save()
    tracking.log_params(tracking.client_for(uri), parent, {"workdir": str(workdir),
                                                           "input": config.input or "(sample dump)",
                                                           "steps": ",".join(config.steps)})
    log.info("workflow MLflow run %s in %s", parent, redact_uri(uri))
    return parent


def _dumps(config: WorkflowConfig, workdir: Path) -> tuple[str, str]:
    """(the dump to curate, the held-out dump): as configured, else generated sample dumps under the workdir."""
    dump, heldout = config.input, config.heldout_input
    if not dump:
        sd = config.sample_dump
        dump = _generated_dump(workdir / "sample-dump", sd.num_videos, sd.seed, sd.shape_size)
        if not heldout and sd.heldout_videos:
            heldout = _generated_dump(workdir / "heldout-dump", max(6, sd.heldout_videos), sd.heldout_seed,
                                      sd.shape_size)
    return dump, heldout


def _hand_down(config: WorkflowConfig, uri: str, parent: str) -> None:
    """The workflow's tracking store, experiment, parent run and Ray cluster into every step's section."""
    for section in (config.curate, config.train_vae, config.train, config.distill, config.evaluate):
        section.tracking.uri = section.tracking.uri or uri
        section.tracking.experiment = config.experiment
        section.tracking.parent_run_id = parent
    for section in (config.curate, config.train_vae, config.encode, config.train, config.distill):
        section.ray.address = config.ray.address or section.ray.address
        section.ray.num_cpus = config.ray.num_cpus or section.ray.num_cpus


def _validate_steps(config: WorkflowConfig) -> None:
    """The training steps' config mistakes, before the first step starts rather than when that step begins."""
    checks = {"train-vae": config.train_vae.validate, "train": config.train.validate,
              "distill": config.distill.round_steps}
    for name in config.steps:
        if name in checks:
            try:
                checks[name]()
            except ConfigError as err:
                raise ConfigError(f"{name}.{err}") from None


def _hand_down_codec(config: WorkflowConfig, paths: dict[str, Path]) -> None:
    """train.codec is the one codec of a run: the VAE the train-vae step exports when it runs, else as configured;
    encode gets it with train's text tower and shapes, so the cache holds what train reads."""
    encode, train, defaults = config.encode, config.train, EncodeConfig()
    for key in ("codec", "text", "curriculum"):
        if getattr(encode, key) != getattr(defaults, key) and getattr(encode, key) != getattr(train, key):
            raise ConfigError(f"encode.{key}: the workflow takes it from train.{key} (one source for the cache and "
                              f"the model); set train.{key} instead")
    if "train-vae" in config.steps:
        folder = paths["train-vae"] / Path(VAE_INFO).parent
        train.codec = CodecConfig(**{**vars(train.codec), "kind": "reelforge-vae", "model": str(folder)})
    encode.codec, encode.text, encode.curriculum = train.codec, train.text, train.curriculum
    encode.windows_per_clip = train.data_loading.windows_per_clip


class _Stopped(Exception):
    def __init__(self, step: str):
        super().__init__(step)
        self.step = step


def summary_text(results: dict) -> str:
    lines = []
    for name in results.get("ran", []):  # each step's own summary, as its subcommand prints it
        if isinstance(results.get(name), dict) and results[name].get("text"):
            lines += [f"== {name}", results[name]["text"], ""]
    if results.get("ran") or results.get("skipped"):
        lines.append(f"steps run: {', '.join(results['ran']) or '-'}; skipped (up to date): "
                     f"{', '.join(results['skipped']) or '-'}")
    if results.get("stopped"):
        lines.append(f"stopped in step {results['stopped']}: rerun the same command to continue")
    lines.append(f"workdir: {results['workdir']}")
    lines.append(f"MLflow parent run: {results['run_id']}")
    uri = results["tracking_uri"]
    ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else f"open {redact_uri(uri)}"
    lines.append(f"look at the runs: {ui}  (then http://127.0.0.1:5000, experiment of run {results['run_id']})")
    return "\n".join(lines)
