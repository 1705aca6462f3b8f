"""Training on a real local Ray cluster with real DeepSpeed engines (ZeRO-2 and ZeRO-3 on gloo, 2 CPU workers):
the loss goes down, a stopped-and-resumed run equals an uninterrupted one step for step, SIGTERM leaves a checkpoint
at the current step, a killed worker is restored into the same MLflow run, the export loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.config import load_config
from pipelines.train import run_train
from training.config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TOTAL = 40


def _config(data, output, *sets: str) -> TrainConfig:
    overrides = [
        "curriculum=[{name: low, steps: 10, num_frames: 4, fps: 4.0, size: 16},"
        " {name: high, steps: 30, num_frames: 8, fps: 8.0, size: 32}]",
        "checkpoint.every_steps=10", "sampling.every_steps=0", "sampling.num_steps=4", "tracking.log_every_steps=1",
        "optim.warmup_steps=5", "optim.lr=1e-3", "deepspeed.micro_batch_size=2",
        "sampling.prompts=['a red circle moving left on a grey background']", *sets,
    ]
    return load_config(TrainConfig, None, overrides, base={"data": str(data), "output": str(output)})


def _history(summary: dict, key: str = "loss") -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], key)
    out: dict[int, float] = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        out[m.step] = m.value  # a step logged again after a restore: the later value is the one that counts
    return out


@pytest.fixture(scope="module")
def zero2_run(curated_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-zero2")
    summary = run_train(_config(curated_sample, out, "deepspeed.zero_stage=2"))
    return out, summary, _history(summary)


def test_zero2_loss_goes_down_and_model_is_registered(zero2_run, curated_sample):
    from mlflow.tracking import MlflowClient

    out, summary, losses = zero2_run
    assert summary["step"] == TOTAL and sorted(losses) == list(range(1, TOTAL + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(TOTAL - 4, TOTAL + 1)) / 5
    assert last < 0.85 * first, (first, last)  # measured 0.80 -> 0.56 in this configuration
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    version = client.get_model_version(summary["registered_model"], summary["model_version"])
    assert version.run_id == summary["run_id"]
    # The run's model/ is an MLflow pyfunc model (training/pyfunc.py) holding the export under artifacts/model
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    weights = {a.path for a in client.list_artifacts(summary["run_id"], "model/artifacts/model")}
    assert {"model/artifacts/model/model.safetensors", "model/artifacts/model/config.json"} <= weights
    samples = {a.path for a in client.list_artifacts(summary["run_id"], "samples")}
    assert {"samples/final.gif", "samples/final.mp4"} <= samples
    run = client.get_run(summary["run_id"]).data
    params = run.params
    assert params["deepspeed.zero_stage"] == "2" and params["model.preset"] == "VDiT-T/2"
    # The data it read, by name: the dataset version (the newest, as --data named none), its Lance version, rows.
    assert params["data"] == f"{curated_sample}@v1"
    assert params["data_dataset_version"] == "1" and params["data_lance_version"].isdigit()
    assert params["data_version"] == summary["data_version"] == run.tags["reelforge.data_version"]
    assert summary["data_version"].startswith(f"v1-lance{params['data_lance_version']}-")
    for key in ("lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_s"):
        assert len(_history(summary, key)) == TOTAL, key
    lrs = _history(summary, "lr")
    assert lrs[5] > lrs[1] and lrs[TOTAL] < lrs[5]  # warm-up, then decay


def test_export_loads_and_samples_in_a_fresh_process(zero2_run):
    out, _, _ = zero2_run
    code = f"""
import sys, torch
from training.export import load_model
from training.sample import generate
loaded = load_model({str(out / 'model')!r})
video = generate(loaded.model, loaded.text_encoder, loaded.schedule, ["a red circle moving left"], 8, 32, 4, 2.0, 0)
assert video.shape == (1, 3, 8, 32, 32) and torch.isfinite(video).all(), video.shape
again = generate(loaded.model, loaded.text_encoder, loaded.schedule, ["a red circle moving left"], 8, 32, 4, 2.0, 0)
assert torch.equal(video, again)
assert not [m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed")]
print("ok", float(video.std()))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


@pytest.fixture(scope="module")
def zero3_run(curated_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-zero3")
    summary = run_train(_config(curated_sample, out, "deepspeed.zero_stage=3"))
    return out, summary, _history(summary)


@pytest.mark.parametrize("zero", [2, 3])
def test_stopped_and_resumed_equals_uninterrupted_at_every_later_step(curated_sample, zero2_run, zero3_run, zero,
                                                                      tmp_path):
    """The data order, the noise, the optimizer, the LR schedule and the EMA all come back: every loss after the
    resume is the uninterrupted run's, to float precision (each micro-batch is a function of (seed, step, rank))."""
    _, reference_summary, reference = zero2_run if zero == 2 else zero3_run
    out = tmp_path / f"train-zero{zero}"
    first = run_train(_config(curated_sample, out, f"deepspeed.zero_stage={zero}", "stop_after_steps=20"))
    assert first["step"] == 20 and first["model_version"] is None
    state = json.loads((out / "ray-train" / "step_00000020" / "train_state.json").read_text())
    assert state["step"] == 20 and state["zero_stage"] == zero and state["world_size"] == 2
    assert state["data_version"] == first["data_version"] and len(state["config_hash"]) == 64
    # Resumed naming the version it trained on (the first run named none: the newest, version 1): the same rows.
    resumed = run_train(_config(f"{curated_sample}@v1", out, f"deepspeed.zero_stage={zero}"))
    assert resumed["step"] == TOTAL and resumed["run_id"] == first["run_id"] and resumed["model_version"]
    losses = _history(resumed)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    # The weights came back exactly: the same sum of |w| (float64, gathered over the ZeRO-3 partitions) as saved.
    assert _history(resumed, "resumed_weights_fingerprint") == {20: pytest.approx(state["weights_fingerprint"],
                                                                                  rel=1e-12)}
    for s in range(1, TOTAL + 1):
        assert losses[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-9), s  # measured: bit-identical
    lrs, reference_lrs = _history(resumed, "lr"), _history(reference_summary, "lr")
    assert [lrs[s] for s in range(21, TOTAL + 1)] == pytest.approx([reference_lrs[s] for s in range(21, TOTAL + 1)])


def test_resuming_against_other_data_or_another_config_says_what_differs(curated_sample, zero2_run, tmp_path):
    from curation.dataset import DatasetError
    from pipelines.config import ConfigError

    out, _, _ = zero2_run
    with pytest.raises(ConfigError, match="scaling.num_workers is 1"):
        run_train(_config(curated_sample, out, "deepspeed.zero_stage=2", "scaling.num_workers=1"))
    with pytest.raises(ConfigError, match="training config differs"):
        run_train(_config(curated_sample, out, "deepspeed.zero_stage=2", "optim.lr=5e-4"))
    state = json.loads((out / "train_state.json").read_text())
    (out / "train_state.json").write_text(json.dumps({**state, "data_version": "v0-elsewhere"}))
    try:
        with pytest.raises(ConfigError, match="accept-data-change"):
            run_train(_config(curated_sample, out, "deepspeed.zero_stage=2"))
        (out / "train_state.json").write_text(json.dumps({**state, "data_version": "v3-lance9-0123456789ab"}))
        with pytest.raises(ConfigError, match=f"pass --data {curated_sample}@v3 to continue on the data it trained"):
            run_train(_config(curated_sample, out, "deepspeed.zero_stage=2"))
        with pytest.raises(DatasetError, match="has no dataset version 3 \\(versions: v1\\)"):
            run_train(_config(f"{curated_sample}@v3", out, "deepspeed.zero_stage=2"))
    finally:
        (out / "train_state.json").write_text(json.dumps(state))


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_rerun_continues_from_it(curated_sample, tmp_path):
    out = tmp_path / "train-sigterm"
    sets = ["curriculum=[{name: long, steps: 400, num_frames: 4, fps: 4.0, size: 16}]", "checkpoint.every_steps=100",
            "sampling.every_steps=0", "tracking.log_every_steps=1", "deepspeed.micro_batch_size=2",
            "ray.address=local", "ray.num_cpus=2"]
    command = [sys.executable, "-m", "pipelines.cli", "train", "--data", str(curated_sample), "--output", str(out),
               *[a for s in sets for a in ("--set", s)]]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        signalled_at = _wait_for_step(out / "progress.json", 12, process)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 3, output[-3000:]
    state = json.loads((out / "train_state.json").read_text())
    saved = state["step"]
    assert signalled_at <= saved < 100, (signalled_at, saved)  # the step it was on, not the last periodic save
    assert (out / "ray-train" / f"step_{saved:08d}" / "train_state.json").is_file()
    assert not (out / "model").exists()
    rerun = subprocess.run([*command, "--set", f"stop_after_steps={saved + 3}"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 3, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resumed from a checkpoint at step {saved}" in rerun.stdout + rerun.stderr
    assert json.loads((out / "train_state.json").read_text())["step"] == saved + 3


def _wait_for_step(progress: Path, step: int, process: subprocess.Popen) -> int:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        try:
            reached = json.loads(progress.read_text())["step"]
        except (OSError, ValueError, KeyError):
            reached = 0
        if reached >= step:
            return reached
        time.sleep(0.1)
    raise AssertionError(f"training never reached step {step}: {process.stdout.read()[-3000:]}")


def test_killed_worker_is_restored_into_the_same_mlflow_run(curated_sample, tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "train-kill"
    killed: dict = {}

    def kill_when_past_first_checkpoint():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            try:
                progress = json.loads((out / "progress.json").read_text())
            except (OSError, ValueError):
                time.sleep(0.2)
                continue
            if progress["step"] >= 14:
                os.kill(progress["pid"], signal.SIGKILL)
                killed.update(progress)
                return
            time.sleep(0.1)

    thread = threading.Thread(target=kill_when_past_first_checkpoint, daemon=True)
    thread.start()
    summary = run_train(_config(curated_sample, out, "deepspeed.zero_stage=2", "checkpoint.max_failures=2"))
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert summary["step"] == TOTAL and summary["model_version"]
    progress = json.loads((out / "progress.json").read_text())
    assert progress["pid"] != killed["pid"] and progress["step"] == TOTAL
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    experiment = client.get_experiment_by_name("reelforge-train")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [summary["run_id"]]
    assert sorted(_history(summary)) == list(range(1, TOTAL + 1))
