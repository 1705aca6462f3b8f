"""Progressive distillation rounds on a real local Ray cluster with real DeepSpeed engines (2 CPU workers, gloo):
each round is a Ray Train run nested under one distill run, each student a registered model version with its step
count, the student learns its teacher's two-step target, and a rerun skips finished rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from models.schedules import NoiseSchedule, ScheduleConfig
from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
from models.vdit import VDiT, vdit_config
from pipelines.config import load_config
from training.distill import DistillConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STAGE = {"name": "native", "steps": 1, "num_frames": 4, "fps": 4.0, "size": 16}
ROUND_STEPS = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny teacher whose adaLN-Zero layers are perturbed, so its output depends on x, t and the prompt (a fresh
    VDiT outputs zeros)."""
    from training.export import save_model

    torch.manual_seed(0)
    text = FrozenTextEncoder(TextEncoderConfig())
    config = vdit_config("VDiT-T/2", context_dim=text.width)
    model = VDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("teacher") / "model"
    save_model(directory, model.state_dict(), config, text, ScheduleConfig(),
               {"preset": "VDiT-T/2", "curriculum": [STAGE], "sampling": {"num_steps": 4, "cfg_scale": 2.0}})
    return directory


@pytest.fixture(scope="module")
def distilled(teacher, curated_sample, tmp_path_factory):
    from pipelines.distill import run_distill

    output = tmp_path_factory.mktemp("distill")
    config = load_config(DistillConfig, None, [
        "teacher_steps=4", "final_steps=1", f"steps_per_round={ROUND_STEPS}", "checkpoint.every_steps=8",
        "tracking.log_every_steps=1", "optim.lr=1e-3", "optim.warmup_steps=2", "deepspeed.micro_batch_size=2",
        "ema_decay=0.0",  # export the raw weights: an EMA over 16 steps would still be mostly the teacher
        "sampling.prompts=[a red circle moving left on a black background]",
    ], base={"teacher": str(teacher), "data": str(curated_sample), "output": str(output)})
    return run_distill(config), config


def test_rounds_halve_the_steps_and_chain_teachers(distilled, teacher):
    summary, config = distilled
    assert summary["finished"]
    assert [r["steps"] for r in summary["rounds"]] == [2, 1]
    first, second = (json.loads((Path(r["model"]) / "config.json").read_text())
                     for r in summary["rounds"])
    assert first["sampling"] == {"num_steps": 2, "cfg_scale": 1.0}
    assert second["sampling"] == {"num_steps": 1, "cfg_scale": 1.0}
    assert first["distilled_from"] == str(teacher) and first["teacher_cfg_scale"] == 2.0  # guidance distilled in
    assert second["distilled_from"] == summary["rounds"][0]["model"] and second["teacher_cfg_scale"] == 1.0
    assert first["model"] == json.loads((teacher / "config.json").read_text())["model"]


def test_each_student_is_a_registered_version_nested_under_the_distill_run(distilled):
    from mlflow.tracking import MlflowClient

    summary, config = distilled
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    name = config.tracking.registered_model
    for r in summary["rounds"]:
        version = client.get_model_version(name, r["model_version"])
        assert version.tags["sampling_steps"] == str(r["steps"])
        assert version.run_id == r["run_id"]
        # MLflow gives a version number as int or str depending on the call; the number is what must agree
        assert str(client.get_model_version_by_alias(name, f"steps-{r['steps']}").version) == str(r["model_version"])
        run = client.get_run(r["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == summary["run_id"]
        assert run.data.tags["reelforge.step"] == "distill-round"
        assert len(client.get_metric_history(r["run_id"], "loss")) == ROUND_STEPS
    # Every round read the version the distill run resolved and recorded.
    distill_run = client.get_run(summary["run_id"]).data
    assert distill_run.params["data"] == f"{config.data.split('@')[0]}@v1" == config.data
    assert distill_run.params["data_dataset_version"] == "1"
    for r in summary["rounds"]:
        params = client.get_run(r["run_id"]).data.params
        assert params["data"] == config.data and params["data_version"] == distill_run.params["data_version"]
    children = client.search_runs([client.get_run(summary["run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert sorted(c.info.run_id for c in children) == sorted(r["run_id"] for r in summary["rounds"])


def test_the_distill_run_compares_in_the_mlflow_ui(distilled):
    """round_wall_seconds by round (the latest shown is the last round's), the data version as a dataset input of
    the distill run and of each round, and each later student naming its teacher's version by models:/ URI."""
    from mlflow.tracking import MlflowClient

    from training.dataset import ClipTable

    summary, config = distilled
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    history = client.get_metric_history(summary["run_id"], "round_wall_seconds")
    assert sorted(m.step for m in history) == [1, 2]
    last = max(history, key=lambda m: m.step)
    assert client.get_run(summary["run_id"]).data.metrics["round_wall_seconds"] == last.value
    assert last.value == pytest.approx(summary["rounds"][1]["wall_seconds"])
    version = ClipTable.open(config.data).version
    for run_id in [summary["run_id"], *(r["run_id"] for r in summary["rounds"])]:
        (data,) = client.get_run(run_id).inputs.dataset_inputs
        assert data.dataset.digest == version
    first, second = summary["rounds"]
    tags = client.get_model_version(config.tracking.registered_model, second["model_version"]).tags
    assert tags["distilled_from_uri"] == f"models:/{first['registered_model']}/{first['model_version']}"
    assert tags["distilled_from_run_id"] == first["run_id"]


def _real_clips(data, count: int = 8) -> torch.Tensor:
    from training.config import CurriculumStage
    from training.data import ClipDecodeStage, to_model_input
    from training.dataset import ClipTable

    rows = pa.Table.from_pylist(ClipTable.open(str(data)).take(range(count)))
    decoded = ClipDecodeStage(CurriculumStage(**STAGE))(rows)
    return to_model_input(decoded["video"]), list(decoded["caption"])


def test_the_first_student_matches_its_teachers_two_steps_better_than_the_teacher_does(distilled, teacher,
                                                                                       curated_sample):
    """Held-out noise on real clips: the distillation error of the trained student is below that of its
    initialisation (the teacher itself, whose one step is not its two)."""
    from training.distill import draw_round_timesteps, guided, step_grids, two_step_target
    from training.export import load_model

    summary, _ = distilled
    base, student = load_model(teacher), load_model(summary["rounds"][0]["model"])
    schedule = NoiseSchedule(ScheduleConfig())
    x0, captions = _real_clips(curated_sample)
    g = torch.Generator().manual_seed(123)  # not a seed any training step used
    grids = step_grids(schedule, 2)
    errors = {"teacher": [], "student": []}
    with torch.no_grad():
        context, mask = base.text_encoder(captions)
        null, null_mask = base.text_encoder([""] * len(captions))
        for _ in range(4):
            t, t_mid, t_prev = draw_round_timesteps(*grids, len(captions), g)
            x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            target = two_step_target(guided(base.model, context, mask, null, null_mask, 2.0), schedule, x_t, t,
                                     t_mid, t_prev)
            for name, m in (("teacher", base.model), ("student", student.model)):
                errors[name].append(torch.mean((m(x_t, t, context, mask) - target) ** 2).item())
    teacher_error, student_error = (sum(v) / len(v) for v in (errors["teacher"], errors["student"]))
    assert student_error < 0.8 * teacher_error, errors


def test_rerun_skips_finished_rounds(distilled):
    from mlflow.tracking import MlflowClient

    from pipelines.distill import run_distill

    summary, config = distilled
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    before = {r["run_id"]: client.get_run(r["run_id"]).info.end_time for r in summary["rounds"]}
    again = run_distill(config)
    assert again["run_id"] == summary["run_id"] and again["finished"]
    assert [r["model_version"] for r in again["rounds"]] == [r["model_version"] for r in summary["rounds"]]
    # no round was trained again: its run was neither reopened nor ended again
    assert {r["run_id"]: client.get_run(r["run_id"]).info.end_time for r in again["rounds"]} == before
