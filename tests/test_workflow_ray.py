"""`reelforge run` end to end on a tiny config, as users run it (a subprocess with its own local Ray cluster): one
MLflow parent run with a nested run per step; killed with SIGKILL in the middle of training, the rerun skips the
finished step, resumes training from its checkpoint and runs the rest; a third run has nothing to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TINY = {
    "sample_dump": {"num_videos": 6, "heldout_videos": 6},
    "ray": {"address": "local", "num_cpus": 2},  # one section for every step: never join another cluster here
    "curate": {"output_files": {"commit_videos": 4}},
    "train": {
        "curriculum": [{"name": "low", "steps": 16, "num_frames": 4, "fps": 4.0, "size": 16},
                       {"name": "high", "steps": 8, "num_frames": 4, "fps": 4.0, "size": 16}],
        "optim": {"warmup_steps": 2},
        "deepspeed": {"micro_batch_size": 2},
        "checkpoint": {"every_steps": 4},
        "sampling": {"every_steps": 0, "num_steps": 4, "prompts": ["a red circle moving left on a black background"]},
        "tracking": {"log_every_steps": 2},
    },
    "distill": {"teacher_steps": 4, "final_steps": 2, "steps_per_round": 4, "deepspeed": {"micro_batch_size": 2},
                "checkpoint": {"every_steps": 4}},
    "evaluate": {"max_videos": 3, "grid_prompts": 3, "metrics": {"clip": {"num_frames": 2}}},
}


def _reelforge(workdir: Path, config: Path, **popen) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    exe = Path(sys.executable).parent / "reelforge"
    return subprocess.Popen([str(exe), "run", "--config", str(config), "--workdir", str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            **popen)


def _checkpoints(workdir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (the ones a rerun restores from). A `step_*` folder alone is not one: it
    appears while the ranks are still writing, and a kill at that moment rightly leaves the rerun starting at 0."""
    snapshot = workdir / "train" / "ray-train" / "checkpoint_manager_snapshot.json"
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
        return []
    return [r["checkpoint_dir_name"] for r in results]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    config, workdir = root / "tiny.yaml", root / "wd"
    config.write_text(yaml.safe_dump(TINY))
    # 1. started, then killed (the whole process group: driver, raylet, workers) once training registered a checkpoint
    first = _reelforge(workdir, config)
    deadline = time.monotonic() + 600
    while not _checkpoints(workdir):
        if first.poll() is not None:
            pytest.fail(f"the workflow ended before training checkpointed:\n{first.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(first.pid, signal.SIGKILL)
            pytest.fail("no training checkpoint within 10 minutes")
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_state = json.loads((workdir / "workflow.json").read_text())
    # 2. rerun to the end, 3. rerun after touching a video of the dump: curation finds nothing new, and the steps
    # downstream, which hash the curated rows and models they read (not file times), have nothing left to do
    outputs, states = [], []
    for rerun in range(2):
        if rerun == 1:
            video = sorted((workdir / "sample-dump").rglob("*.mp4"))[0]
            os.utime(video, (time.time(), time.time()))
        proc = _reelforge(workdir, config)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]
        outputs.append(out)
        states.append(json.loads((workdir / "workflow.json").read_text()))
    assert {s: states[0]["steps"][s]["hash"] for s in ("train", "distill", "evaluate")} == \
        {s: states[1]["steps"][s]["hash"] for s in ("train", "distill", "evaluate")}
    assert states[0]["steps"]["curate"]["hash"] != states[1]["steps"]["curate"]["hash"]  # the listing changed
    assert states[0]["steps"]["curate"]["hash"] == killed_state["steps"]["curate"]["hash"]  # the rerun skipped it
    return workdir, killed_state, states[1], outputs


def test_the_kill_landed_in_training_after_curation_finished(workflow):
    _, killed, _, _ = workflow
    assert killed["steps"]["curate"]["status"] == "finished"
    assert killed["steps"]["train"]["status"] == "running"
    assert "distill" not in killed["steps"]


def test_rerun_skips_the_finished_step_and_resumes_training(workflow):
    workdir, killed, state, (second, third) = workflow
    assert "steps run: train, distill, evaluate; skipped (up to date): curate" in second
    assert "resumed from a checkpoint at step" in second  # training went on from its checkpoint, not step 0
    assert all(state["steps"][s]["status"] == "finished" for s in ("curate", "train", "distill", "evaluate"))
    assert "steps run: curate; skipped (up to date): train, distill, evaluate" in third
    assert "nothing new: dataset version 1 is up to date" in third
    assert state["run_id"] == killed["run_id"]  # one parent run across the three invocations


def test_one_parent_run_with_a_nested_run_per_step(workflow):
    from mlflow.tracking import MlflowClient

    workdir, _, state, _ = workflow
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    parent = client.get_run(state["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{state['run_id']}'")
    steps = sorted(c.data.tags.get("reelforge.step") for c in children)
    # curate twice: the training dump and the held-out dump evaluation reads
    assert steps == ["curate", "curate", "distill", "evaluate", "train"], steps
    train = next(c for c in children if c.data.tags["reelforge.step"] == "train")
    assert train.info.run_id == state["steps"]["train"]["summary"]["run_id"]  # the killed run was continued
    assert client.get_metric_history(train.info.run_id, "resumed_weights_fingerprint")
    for name in ("curate", "train", "distill", "evaluate"):
        assert parent.data.tags[f"reelforge.{name}.status"] == "finished"
        assert parent.data.tags[f"reelforge.{name}.hash"] == state["steps"][name]["hash"]
    assert (workdir / "evaluate" / "comparison.csv").is_file()
