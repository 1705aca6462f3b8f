"""The train-vae workflow: `reelforge train` with the causal VAE as the loop's task (same Ray Train + DeepSpeed
engine, checkpoints, resume and MLflow run), then the exported `vae/` folder logged and registered."""

from __future__ import annotations

import json
import logging
import os

from curation.discover import join_uri
from curation.outputs import OutputDir
from curation.redact import redact_uri
from pipelines import tracking
from pipelines.train import run_train
from training.vae.config import VAETrainConfig
from training.vae.task import INFO_FILE, VAETask

log = logging.getLogger("reelforge.train")


def run_train_vae(config: VAETrainConfig) -> dict:
    """Train the VAE of `config.vae` on `config.data` into `config.output`; rerunning the same command resumes."""
    summary = run_train(config, step="train-vae", task=VAETask)
    out = OutputDir(config.output)
    summary["model"] = join_uri(config.output, out.path(VAETask.EXPORT_DIR))
    summary["heldout"] = _heldout_history(summary)
    if summary["step"] >= summary["total_steps"] and out.exists(VAETask.EXPORT_DIR, INFO_FILE):
        info = json.loads(out.read_text(f"{VAETask.EXPORT_DIR}/{INFO_FILE}"))
        summary["sha256"] = info["sha256"]
        summary["model_version"] = _register(tracking.client_for(summary["tracking_uri"]), summary["run_id"], config,
                                             info)
    return summary


def _heldout_history(summary: dict) -> dict[str, dict[int, float]]:
    """step -> value of the held-out metrics of the run (a step logged again after a restore: the later value)."""
    client = tracking.client_for(summary["tracking_uri"])
    history = {}
    for key in ("heldout_psnr", "heldout_ssim"):
        values: dict[int, float] = {}
        for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.timestamp):
            values[m.step] = m.value
        history[key.removeprefix("heldout_")] = dict(sorted(values.items()))
    return history


def _register(client, run_id: str, config: VAETrainConfig, info: dict) -> str | None:
    """Log `vae/` as the run's artifacts and register it as a version of tracking.registered_model, once per run
    and weights (a rerun finds the version by the sha256 tag)."""
    from mlflow.exceptions import MlflowException

    name = config.tracking.registered_model
    try:
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        found = []
    same = [v for v in found if v.tags.get("reelforge.vae_sha256") == info["sha256"]]
    if same:
        return str(min(int(v.version) for v in same))
    folder = VAETask.EXPORT_DIR
    if "://" in config.output and not config.output.startswith("file://"):
        source = redact_uri(join_uri(config.output, OutputDir(config.output).path(folder)))
        log.warning("the VAE stays at %s (remote outputs are not copied into MLflow)", source)
    else:
        client.log_artifacts(run_id, os.path.join(config.output, folder), folder)
        source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{folder}"
    try:
        client.create_registered_model(name, description=VAETask.DESCRIPTION)
    except MlflowException:
        pass  # it exists
    tags = {**VAETask.registration_tags(config), "reelforge.vae_sha256": info["sha256"]}
    version = str(client.create_model_version(name, source, run_id=run_id, tags=tags).version)
    client.set_tag(run_id, "reelforge.model_version", version)
    log.info("registered %s version %s", name, version)
    return version


def summary_text(summary: dict) -> str:
    psnr, ssim = summary["heldout"]["psnr"], summary["heldout"]["ssim"]
    lines = []
    if summary.get("model_version"):
        lines.append(f"VAE: {summary['model']} (sha256 {summary['sha256']}; registered as "
                     f"{summary['registered_model']} version {summary['model_version']})")
    else:
        lines.append(f"stopped at step {summary['step']} of {summary['total_steps']}; rerun the same command to "
                     "continue")
    if psnr:
        first, last = min(psnr), max(psnr)
        lines.append(f"held-out PSNR {psnr[first]:.2f} dB at step {first} -> {psnr[last]:.2f} dB at step {last}; "
                     f"SSIM {ssim[first]:.4f} -> {ssim[last]:.4f}")
    lines += [f"MLflow run: {summary['run_id']} in {redact_uri(summary['tracking_uri'])}",
              f"wall time: {summary['wall_seconds']:.1f} s"]
    return "\n".join(lines)
