"""The whole workflow as one command: (a sample dump when no input is given) -> curate -> train.

Each step is the same function its own subcommand runs, so the workflow inherits their reruns: curation processes
only new videos and training resumes from its last checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from curation.config import CurateConfig
from training.config import TrainConfig

log = logging.getLogger("reelforge.run")


@dataclass
class WorkflowConfig:
    workdir: str = "runs/quickstart"  # curated/, train/ and the MLflow store of the workflow live here
    input: str = ""  # a video dump; empty: generate the sample dump under workdir/sample-dump
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db for every step
    steps: list[str] = field(default_factory=lambda: ["curate", "train"])
    curate: CurateConfig = field(default_factory=CurateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


STEPS = ("curate", "train")


def run_workflow(config: WorkflowConfig) -> dict:
    unknown = [s for s in config.steps if s not in STEPS]
    if unknown:
        raise ValueError(f"steps: unknown step {unknown[0]!r} (known: {', '.join(STEPS)})")
    workdir = Path(config.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    from pipelines import tracking

    uri = tracking.tracking_uri(config.tracking_uri, workdir)
    results: dict = {"workdir": str(workdir), "tracking_uri": uri}
    dump = config.input
    if not dump:
        from curation.sample_dump import make_sample_dump

        dump = str(workdir / "sample-dump")
        if not (Path(dump) / "sample_truth.json").exists():
            make_sample_dump(dump)
            log.info("generated the sample dump in %s", dump)
    curated = config.curate.output or str(workdir / "curated")
    if "curate" in config.steps:
        from pipelines.curate import run_curate

        config.curate.input = config.curate.input or dump
        config.curate.output = curated
        config.curate.tracking.uri = config.curate.tracking.uri or uri
        results["curate"] = run_curate(config.curate)
    if "train" in config.steps:
        from pipelines.train import run_train

        config.train.data = config.train.data or curated
        config.train.output = config.train.output or str(workdir / "train")
        config.train.tracking.uri = config.train.tracking.uri or uri
        results["train"] = run_train(config.train)
    return results


