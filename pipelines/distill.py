"""The distill workflow: progressive distillation rounds, each a Ray Train + DeepSpeed run of the training machinery
(checkpoints, resume, MLflow), each student a registered model version with its step count.

MLflow: one `distill` run (nested under `tracking.parent_run_id` when a workflow runs it) with a nested run per
round. A rerun skips finished rounds (their `round.json` exists) and resumes the first unfinished one from its last
checkpoint.

Data: `--data` is a curated dataset (each step decodes clips and encodes them through the teacher's codec) or, for a
latent teacher, the latent cache it was trained from (`reelforge encode` with its codec, text encoder and last
curriculum stage: no decode, no VAE and no text tower in the step; `reelforge run` passes the cache). A cache made
with another codec or text encoder is refused, as `reelforge train` refuses it."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path

from curation.lock import OutputLock
from curation.outputs import OutputDir
from curation.redact import redact_uri, redacted_yaml
from pipelines import tracking
from pipelines.config import ConfigError, flatten
from pipelines.train import _absolute, run_train
from training.distill import DistillConfig, round_train_config
from training.latent_dataset import LatentTable
from training.objective import DistillRound
from training.publish import sweep_temporary

log = logging.getLogger("reelforge.distill")

ROUND_FILE = "round.json"


def _teacher_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"teacher {model_dir} has no config.json: expected the `model/` folder of a "
                                "training run (e.g. runs/quickstart/train/model)")
    return json.loads(path.read_text())


def _lineage(registered: dict | None) -> dict[str, str]:
    """The tags a student's model version gets naming its teacher's registered version and run (when known)."""
    if not registered:
        return {}
    return {"distilled_from_uri": registered["uri"], "distilled_from_run_id": registered["run_id"]}


def round_dir_name(index: int, steps: int) -> str:
    return f"round-{index}-{steps}steps"


def run_distill(config: DistillConfig) -> dict:
    """Distil `config.teacher` into students of halving step counts under `config.output`."""
    if not config.teacher or not config.data or not config.output:
        raise ValueError("distill needs --teacher (an exported model), --data (a curated dataset, or the teacher's "
                         "latent cache) and --output")
    if "://" in config.teacher and not config.teacher.startswith("file://"):
        raise ConfigError("teacher: a local model folder is expected (every worker loads it); copy the model "
                          "locally or to a shared file system first")
    config.teacher = str(Path(config.teacher.removeprefix("file://")).resolve())
    config.data, config.output = _absolute(config.data), _absolute(config.output)
    from training.latent_dataset import open_training_data

    table = open_training_data(config.data)  # a curated dataset or a latent cache; a wrong --data fails now
    config.data = table.data_uri  # DIR@vN: every round reads this version, and the saved config names it
    rounds = config.round_steps()
    teacher = _teacher_config(config.teacher)
    cfg_scale = config.teacher_cfg_scale
    if cfg_scale is None:
        cfg_scale = float(teacher.get("sampling", {}).get("cfg_scale", 1.0))

    with OutputLock(config.output):  # one run per output: its rounds and its MLflow run are its own
        return _distill(config, table, rounds, cfg_scale, teacher)


def _distill(config: DistillConfig, table, rounds: list[int], cfg_scale: float, teacher: dict) -> dict:
    out = OutputDir(config.output)
    out.makedirs()
    sweep_temporary(config.output, folders=("",))  # what a killed run left half-written; this run holds the lease
    out.write_bytes_atomic("distill-config.yaml", redacted_yaml(config).encode())
    uri, run_id = tracking.output_run(config.output, config.tracking.uri, config.tracking.experiment,
                                      {"reelforge.step": "distill", "reelforge.teacher": config.teacher,
                                       "reelforge.data": config.data, "reelforge.data_version": table.version,
                                       "reelforge.output": config.output}, config.tracking.parent_run_id)
    client = tracking.client_for(uri)
    tracking.log_params(client, run_id, {**flatten(config), **tracking.data_params(table), "rounds": rounds,
                                         "teacher_cfg_scale_used": cfg_scale})
    tracking.log_dataset_input(client, run_id, table, "training")
    teacher_lineage = _lineage(tracking.registered_version(client, config.teacher))
    if teacher_lineage:
        client.set_tag(run_id, "reelforge.teacher_uri", teacher_lineage["distilled_from_uri"])
        client.set_tag(run_id, "reelforge.teacher_run_id", teacher_lineage["distilled_from_run_id"])
    log.info("distilling %s: %d -> %s steps; MLflow run %s in %s", config.teacher, config.teacher_steps,
             " -> ".join(map(str, rounds)), run_id, redact_uri(uri))

    started = time.perf_counter()
    is_cache = isinstance(table, LatentTable)
    summaries: list[dict] = []
    teacher_dir, teacher_steps = config.teacher, config.teacher_steps
    for index, steps in enumerate(rounds, start=1):
        name = round_dir_name(index, steps)
        round_out = OutputDir(f"{config.output}/{name}")
        if round_out.exists(ROUND_FILE):
            summary = json.loads(round_out.read_text(ROUND_FILE))
            log.info("round %d (%d -> %d steps) finished earlier: %s", index, teacher_steps, steps, summary["model"])
        else:
            round_config = round_train_config(config, teacher, steps, round_out.uri, cached=is_cache)
            round_config.tracking = replace(config.tracking, parent_run_id=run_id, uri=uri)
            round_cfg_scale = cfg_scale if index == 1 else 1.0  # later teachers have guidance distilled in
            log.info("round %d: %d-step student from the %d-step teacher %s (guidance %g)", index, steps,
                     teacher_steps, teacher_dir, round_cfg_scale)
            result = run_train(
                round_config,
                distill=DistillRound(teacher=teacher_dir, student_steps=steps, cfg_scale=round_cfg_scale,
                                     round=index, base_model=config.teacher),
                step="distill-round",
                register_tags={"sampling_steps": steps, "round": index, "distilled_from": teacher_dir,
                               "base_model": config.teacher, **teacher_lineage},
                alias=f"steps-{steps}")
            if result["model_version"] is None and result["step"] < result["total_steps"]:
                log.warning("round %d stopped at step %d of %d; rerun to continue", index, result["step"],
                            result["total_steps"])
                summaries.append({"round": index, "steps": steps, "finished": False, **result})
                break
            summary = {"round": index, "steps": steps, "teacher_steps": teacher_steps, "finished": True,
                       "model": result["model"], "model_version": result["model_version"],
                       "run_id": result["run_id"], "registered_model": result["registered_model"],
                       "wall_seconds": result["wall_seconds"]}
            round_out.write_bytes_atomic(ROUND_FILE, json.dumps(summary, indent=2).encode())
        summaries.append(summary)
        # step = the round, so the value the UI shows as latest is the last round's (steps would run 16, 8, 4)
        client.log_metric(run_id, "round_wall_seconds", float(summary["wall_seconds"]), step=index)
        client.log_metric(run_id, "round_student_steps", float(steps), step=index)
        teacher_lineage = _lineage({"uri": tracking.model_uri(summary["registered_model"], summary["model_version"]),
                                    "run_id": summary["run_id"]} if summary.get("model_version") else None)
        teacher_dir, teacher_steps = summary["model"], steps
        teacher = _teacher_config(teacher_dir)
    finished = len(summaries) == len(rounds) and all(s["finished"] for s in summaries)
    client.log_metric(run_id, "wall_seconds", sum(float(s["wall_seconds"]) for s in summaries if s["finished"]))
    tracking.finish_run(uri, run_id, status="FINISHED" if finished else "KILLED")
    return {"run_id": run_id, "tracking_uri": uri, "teacher": config.teacher, "rounds": summaries,
            "finished": finished, "wall_seconds": time.perf_counter() - started,
            "students": {s["steps"]: s["model"] for s in summaries if s["finished"]}}


def summary_text(summary: dict) -> str:
    lines = [f"distilled {summary['teacher']}"]
    for s in summary["rounds"]:
        if s["finished"]:
            lines.append(f"  round {s['round']}: {s['steps']}-step student {s['model']} "
                         f"({s['registered_model']} version {s['model_version']}, {s['wall_seconds']:.0f} s)")
        else:
            lines.append(f"  round {s['round']}: stopped at step {s['step']} of {s['total_steps']}; rerun to "
                         "continue")
    lines.append(f"MLflow run: {summary['run_id']} in {redact_uri(summary['tracking_uri'])}")
    return "\n".join(lines)
