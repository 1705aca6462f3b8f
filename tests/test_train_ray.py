"""Training on a real local Ray cluster with real DeepSpeed engines (ZeRO-2 and ZeRO-3 on gloo, 2 CPU workers):
the loss goes down, checkpoints resume, a killed worker is restored into the same MLflow run, the export loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

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
        "optim.warmup_steps=5", "optim.lr=1e-3", "deepspeed.micro_batch_size=2", *sets,
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


def test_zero2_loss_goes_down_and_model_is_registered(zero2_run):
    from mlflow.tracking import MlflowClient

    out, summary, losses = zero2_run
    assert summary["step"] == TOTAL and sorted(losses) == list(range(1, TOTAL + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(TOTAL - 4, TOTAL + 1)) / 5
    assert last < 0.85 * first, (first, last)  # measured 0.80 -> 0.56 in this configuration
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    version = client.get_model_version(summary["registered_model"], summary["model_version"])
    assert version.run_id == summary["run_id"]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"], "model")}
    assert {"model/model.safetensors", "model/config.json"} <= artifacts
    samples = {a.path for a in client.list_artifacts(summary["run_id"], "samples")}
    assert {"samples/final.gif", "samples/final.mp4"} <= samples
    params = client.get_run(summary["run_id"]).data.params
    assert params["deepspeed.zero_stage"] == "2" and params["model.preset"] == "VDiT-T/2"
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


def test_zero3_resume_continues_the_step_count_and_matches_an_uninterrupted_run(curated_sample, zero2_run,
                                                                                 tmp_path):
    _, _, reference = zero2_run
    out = tmp_path / "train-zero3"
    first = run_train(_config(curated_sample, out, "deepspeed.zero_stage=3", "stop_after_steps=20"))
    assert first["step"] == 20 and first["model_version"] is None
    state = json.loads((out / "ray-train" / "step_00000020" / "train_state.json").read_text())
    assert state["step"] == 20 and state["zero_stage"] == 3
    saved_fingerprint = state["weights_fingerprint"]
    resumed = run_train(_config(curated_sample, out, "deepspeed.zero_stage=3"))
    assert resumed["step"] == TOTAL and resumed["run_id"] == first["run_id"] and resumed["model_version"]
    losses = _history(resumed)
    assert sorted(losses) == list(range(1, TOTAL + 1))
    # The weights came back exactly: the same sum of |w| (float64, gathered over the ZeRO-3 partitions) as saved.
    assert _history(resumed, "resumed_weights_fingerprint") == {20: pytest.approx(saved_fingerprint, rel=1e-12)}
    # The resumed run continues the uninterrupted one's LR schedule exactly: the scheduler state and step count
    # came back from the checkpoint (both runs share the config, so their schedules are identical step by step).
    lrs, reference_lrs = _history(resumed, "lr"), _history(zero2_run[1], "lr")
    for s in range(21, TOTAL + 1):
        assert lrs[s] == pytest.approx(reference_lrs[s], rel=1e-6), s
    # Losses: ZeRO-3 and ZeRO-2 do the same arithmetic on the same noise (drawn from the step number), but each run
    # draws its own batches (Ray Data's split and the local shuffle are not replayed), and with 17 clips and 4
    # samples a step that moves 10-step mean losses by up to 12.5% between two runs (measured in three runs: 2.3%,
    # 1.6%, 12.5%); the exact checks are the fingerprint and the LR above.
    mean = lambda values, lo, hi: sum(values[s] for s in range(lo, hi + 1)) / (hi - lo + 1)  # noqa: E731
    first, after_resume = mean(losses, 1, 5), mean(losses, 21, 30)
    print(f"steps 21-40: resumed ZeRO-3 {mean(losses, 21, 40):.4f}, uninterrupted ZeRO-2 "
          f"{mean(reference, 21, 40):.4f}; steps 1-5 {first:.4f}, steps 21-30 {after_resume:.4f}")
    assert abs(mean(losses, 21, 40) - mean(reference, 21, 40)) < 0.25 * mean(reference, 21, 40)


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
