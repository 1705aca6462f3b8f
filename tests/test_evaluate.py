"""The evaluate step on two tiny random VDiT-T exports (a "teacher" sampled with 32 guided steps and a "student" with
4 unguided ones) against sample-dump shots rendered at the evaluation format: Fréchet sanity (real vs real is 0),
fixed seeds, the cost column, the comparison files and grid, and the MLflow parent and child runs read back."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from model_exports import export_random_model
from PIL import Image

from curation.sample_dump import _Sampler
from pipelines.config import ConfigError, load_config
from training.evaluate import (
    UNTRAINED_NOTE,
    EvaluateConfig,
    ModelSpec,
    RealClips,
    Scorers,
    VideoFormat,
    compare_with_real,
    evaluate,
    generate_videos,
    real_reference,
    resolve_models,
    video_format,
    video_grid,
    write_outputs,
)
from training.export import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, SIZE, FPS = 4, 16, 4.0
NATIVE = [{"name": "low", "steps": 10, "num_frames": 8, "fps": 8.0, "size": 32},
          {"name": "high", "steps": 10, "num_frames": FRAMES, "fps": FPS, "size": SIZE}]


def _export(directory, seed: int, sampling: dict, **extra) -> str:
    return str(export_random_model(directory, seed, sampling, NATIVE, **extra))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    teacher = _export(root / "train" / "model", 0, {"num_steps": 32, "cfg_scale": 3.0})
    student = _export(root / "distill" / "model", 1, {"num_steps": 4, "cfg_scale": 1.0}, distilled_from=teacher,
                      round=1)
    return {"teacher": teacher, "student": student}


def _real_clips(count: int, seed: int = 0) -> RealClips:
    """Sample-dump shots rendered by the dump's own sampler straight at the evaluation format."""
    sampler = _Sampler(np.random.default_rng(seed), SIZE, SIZE, int(FPS))
    videos, captions = [], []
    for _ in range(count):
        shot = sampler.shot("moving", 0, FRAMES - 1, 0, FRAMES - 1, None)
        videos.append(np.stack([shot.render(i, SIZE, SIZE, sampler.radius) for i in range(FRAMES)]))
        captions.append(shot.caption)
    return RealClips(np.stack(videos), captions, [f"clip-{i}" for i in range(count)])


def _config(exported, output, *sets: str, **base) -> EvaluateConfig:
    models = f"models=[{{path: {exported['teacher']}}}, {{path: {exported['student']}}}]"
    return load_config(EvaluateConfig, None, [models, *sets], base={"output": str(output), **base})


@pytest.fixture(scope="module")
def real() -> RealClips:
    return _real_clips(6)


@pytest.fixture(scope="module")
def evaluated(exported, real, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluate")
    result = evaluate(_config(exported, out, "max_videos=6"), real=real)
    return out, result


def test_names_sampling_and_format_come_from_config_json(exported):
    teacher, student = resolve_models([ModelSpec(path=exported["teacher"]), ModelSpec(path=exported["student"])])
    assert (teacher.name, teacher.role, teacher.num_steps, teacher.cfg_scale) == ("teacher-32", "teacher", 32, 3.0)
    assert (student.name, student.role, student.num_steps, student.cfg_scale) == ("student-4", "student", 4, 1.0)
    # The cost convention: guidance runs the conditional and unconditional halves, 2 evaluations per step.
    assert (teacher.model_evaluations_per_video, student.model_evaluations_per_video) == (64, 4)
    overridden = resolve_models([ModelSpec(path=exported["teacher"]),
                                 ModelSpec(path=exported["teacher"].removesuffix("/model"), num_steps=32),
                                 ModelSpec(path=exported["teacher"], num_steps=8, cfg_scale=1.0)])
    assert [m.name for m in overridden] == ["teacher-32", "teacher-32-2", "teacher-8"]
    assert overridden[2].model_evaluations_per_video == 8
    config = EvaluateConfig(models=[ModelSpec(path=exported["teacher"])])
    fmt = video_format(config, teacher)  # the last curriculum stage, not the first
    assert (fmt.num_frames, fmt.size, fmt.fps) == (FRAMES, SIZE, FPS)
    config.size = 24
    assert video_format(config, teacher).size == 24


def test_config_errors_name_the_key(exported, tmp_path):
    with pytest.raises(ConfigError, match="models"):
        EvaluateConfig().validate()
    with pytest.raises(ConfigError, match=r"models\[0\]\.num_steps"):
        load_config(EvaluateConfig, None, ["models=[{path: x, num_steps: 0}]"]).validate()
    with pytest.raises(ConfigError, match=r"unknown config key models\[0\]\.step"):
        load_config(EvaluateConfig, None, ["models=[{path: x, step: 4}]"])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_models([ModelSpec(path=str(tmp_path))])
    config = _config(exported, tmp_path, "metrics.i3d_path=/nowhere/i3d.pt")  # 4 frames < the protocol's 16
    with pytest.raises(ConfigError, match="i3d_num_frames"):
        video_format(config, resolve_models(config.models)[0])


def test_frechet_of_real_against_itself_is_zero_and_noise_is_far(real):
    scorers = Scorers(EvaluateConfig().metrics, "cpu")
    reference = real_reference(real, scorers, VideoFormat(FRAMES, SIZE, FPS))
    same = compare_with_real(real.videos, scorers.per_video(real.videos, real.captions, FPS), scorers, reference)
    assert same["frechet_clip_frame"] == pytest.approx(0.0, abs=1e-6)
    assert same["motion_wasserstein"] == pytest.approx(0.0, abs=1e-9)
    other = _real_clips(6, seed=1).videos  # other shots of the same distribution
    near = compare_with_real(other, scorers.per_video(other, real.captions, FPS), scorers, reference)
    noise = np.random.default_rng(0).integers(0, 256, real.videos.shape, dtype=np.uint8)
    far = compare_with_real(noise, scorers.per_video(noise, real.captions, FPS), scorers, reference)
    assert far["frechet_clip_frame"] > 2 * near["frechet_clip_frame"] > 0  # measured 0.21 and 0.046
    # Frozen videos (each real clip's first frame held) do not move at all: the motion distance is the real motion.
    frozen = np.repeat(real.videos[:, :1], FRAMES, axis=1)
    still = compare_with_real(frozen, scorers.per_video(frozen, real.captions, FPS), scorers, reference)
    assert still["motion_median_difference"] == pytest.approx(-reference.metrics["motion_median"], abs=0.01)
    assert still["motion_wasserstein"] > 3 * near["motion_wasserstein"]  # measured 1.1 for other real shots
    # The adherence detector reads the real clips correctly, so a model's accuracy can be read against it.
    assert reference.metrics["both_accuracy"] == reference.metrics["background_accuracy"] == 1.0


def test_one_row_per_model_with_finite_frechet_and_the_cost_of_each(evaluated, real):
    _, result = evaluated
    rows = result.rows()
    assert [r["model"] for r in rows] == ["teacher-32", "student-4"]
    assert all(list(r) == ["model", "path", *result.columns] for r in rows)
    for row in rows:
        assert math.isfinite(row["frechet_clip_frame"]) and row["frechet_clip_frame"] > 0
        assert math.isfinite(row["motion_wasserstein"]) and row["seconds_per_video"] > 0
        assert row["num_videos"] == row["prompts_scored"] == 6
        assert all(0.0 <= row[k] <= 1.0 for k in ("color_accuracy", "direction_accuracy", "both_accuracy"))
    assert [(r["num_steps"], r["cfg_scale"], r["model_evaluations_per_video"]) for r in rows] == [(32, 3.0, 64),
                                                                                                  (4, 1.0, 4)]
    assert result.prompts == real.captions and result.seeds == list(range(6))
    assert result.untrained_metrics == ["frechet_clip_frame", "clipsim_mean"]
    assert any(UNTRAINED_NOTE in note for note in result.notes)
    assert result.real["both_accuracy"] == 1.0
    # Random models are far from the shapes: further than other real shots are (measured ~0.02 vs ~0.002).
    other = _real_clips(6, seed=1).videos
    scorers = Scorers(EvaluateConfig().metrics, "cpu")
    reference = real_reference(real, scorers, result.format)
    near = compare_with_real(other, scorers.per_video(other, real.captions, FPS), scorers, reference)
    assert min(r["frechet_clip_frame"] for r in rows) > near["frechet_clip_frame"]


def test_every_model_generates_prompt_i_from_seed_plus_i(evaluated, exported):
    from training.data import to_uint8
    from training.sample import generate

    _, result = evaluated
    teacher, student = result.models
    assert teacher.videos.shape == student.videos.shape == (6, FRAMES, SIZE, SIZE, 3)
    assert not np.array_equal(teacher.videos, student.videos)
    loaded = load_model(exported["teacher"])
    # Prompt 2 alone, from seed 0 + 2: the same video as inside the 6-prompt evaluation.
    alone = generate(loaded.model, loaded.text_encoder, loaded.schedule, [result.prompts[2]], FRAMES, SIZE, 32, 3.0,
                     seed=2)
    assert np.array_equal(to_uint8(alone)[0], teacher.videos[2])
    fmt = result.format
    again, _ = generate_videos(loaded, result.prompts[:2], fmt, 32, 3.0, 0, torch.device("cpu"))
    assert np.array_equal(again, teacher.videos[:2])
    shifted, _ = generate_videos(loaded, result.prompts[:2], fmt, 32, 3.0, 1, torch.device("cpu"))
    assert not np.array_equal(shifted[0], teacher.videos[0])


def test_comparison_files_and_grid(evaluated):
    out, result = evaluated
    written = write_outputs(result, out, grid_prompts=4, cell_px=64)
    assert {"comparison.csv", "comparison.md", "grid.gif", "samples/teacher-32.gif", "samples/student-4.gif",
            "samples/real.gif", "prompts.txt", "results.json", "speed_vs_quality.png"} == set(written)
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["model"] for r in rows] == ["teacher-32", "student-4"]
    assert all(math.isfinite(float(r["frechet_clip_frame"])) for r in rows)
    assert [r["model_evaluations_per_video"] for r in rows] == ["64", "4"]
    assert rows[0]["untrained_metrics"] == "frechet_clip_frame;clipsim_mean"
    markdown = (out / "comparison.md").read_text()
    assert "| frechet_clip_frame † |" in markdown and "| clipsim_mean † |" in markdown
    assert "| flicker_mean |" in markdown and UNTRAINED_NOTE in markdown
    assert markdown.count("| teacher-32 |") == markdown.count("| student-4 |") == 1
    # 16 px videos enlarged 4x to 64 px cells with 2 px gaps: 2 model rows x 4 prompt columns, every frame, with
    # a band of model labels on the left and of prompts on top (labels: tests/test_mlflow_compare.py).
    with Image.open(out / "grid.gif") as gif:
        assert gif.size[0] > 4 * 66 - 2 and gif.size[1] > 2 * 66 - 2 and gif.n_frames == FRAMES
    # Every prompt of one model in rows of 8 (6 prompts: one row), each clip 64 px with its prompt under it.
    with Image.open(out / "samples" / "student-4.gif") as gif:
        assert gif.size[0] == 6 * 66 - 2 and gif.size[1] > 64
    results = json.loads((out / "results.json").read_text())
    assert results["clip_ids"] == [f"clip-{i}" for i in range(6)]
    assert len(results["models"][1]["per_video"]["flicker"]) == 6


def test_video_grid_places_row_r_column_c():
    videos = np.zeros((2, 3, 1, 4, 5, 3), np.uint8)  # (rows, columns, T, H, W, 3)
    for r in range(2):
        for c in range(3):
            videos[r, c] = 10 * r + c + 1
    grid = video_grid(list(videos), pad=1)
    assert grid.shape == (1, 2 * 5 - 1, 3 * 6 - 1, 3)
    for r in range(2):
        for c in range(3):
            assert (grid[0, r * 5:r * 5 + 4, c * 6:c * 6 + 5] == 10 * r + c + 1).all()
    assert (grid[0, 4] == 255).all() and (grid[0, :, 5] == 255).all()  # the gaps


def test_run_evaluate_logs_child_runs_under_the_parent_and_reruns_in_place(exported, tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.evaluate import run_evaluate, summary_text

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # The teacher's train run registered it: its id sits beside the model, as pipelines/train.py leaves it.
    train_run = client.create_run(client.create_experiment("reelforge-train")).info.run_id
    client.create_registered_model("reelforge-vdit")
    client.create_model_version("reelforge-vdit", exported["teacher"], run_id=train_run)
    (tmp_path / "train").mkdir()
    teacher_dir = tmp_path / "train" / "model"
    teacher_dir.symlink_to(exported["teacher"], target_is_directory=True)
    (tmp_path / "train" / "mlflow_run_id").write_text(train_run)
    workflow = client.create_run(client.create_experiment("reelforge")).info.run_id

    output = tmp_path / "evaluate"
    overrides = [f"models=[{{path: {tmp_path / 'train'}}}, {{path: {exported['student']}}}]",
                 f"tracking.uri={uri}", f"tracking.parent_run_id={workflow}", "grid_prompts=2"]
    config = load_config(EvaluateConfig, None, overrides, base={"output": str(output)})
    summary = run_evaluate(config)
    assert [r["model"] for r in summary["models"]] == ["teacher-32", "student-4"]
    assert [r["registered_version"] for r in summary["models"]] == ["1", None]
    assert summary["real"] is None and "no held-out data" in summary["notes"][0]

    parent = client.get_run(summary["run_id"])
    assert parent.data.tags["mlflow.parentRunId"] == workflow and parent.info.status == "FINISHED"
    assert parent.data.tags["scores_untrained"] == "true" and UNTRAINED_NOTE in parent.data.tags["untrained_note"]
    assert parent.data.params["models.1.path"] == exported["student"]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"comparison.csv", "comparison.md", "grid.gif", "prompts.txt", "evaluate-config.yaml"} <= artifacts
    experiment = parent.info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    by_name = {c.data.tags["mlflow.runName"]: c for c in children}
    assert set(by_name) == {"teacher-32", "student-4"} and summary["child_runs"] == {
        name: run.info.run_id for name, run in by_name.items()}
    teacher, student = by_name["teacher-32"].data, by_name["student-4"].data
    assert teacher.tags["reelforge.model_path"] == str(teacher_dir) and teacher.params["registered_version"] == "1"
    assert (teacher.params["num_steps"], teacher.params["cfg_scale"]) == ("32", "3.0")
    assert (student.params["num_steps"], student.params["cfg_scale"], student.params["registered_version"]) == (
        "4", "1.0", "unknown")
    assert student.tags["reelforge.distilled_from"] == exported["teacher"] and student.params["round"] == "1"
    # Identical metric names, so the MLflow UI lines the models up; no real clips, so no Fréchet distance.
    assert set(teacher.metrics) == set(student.metrics)
    assert {"untrained_clipsim_mean", "flicker_mean", "seconds_per_video", "both_accuracy"} <= set(teacher.metrics)
    assert not any(k.startswith("frechet") for k in teacher.metrics)
    assert (teacher.metrics["model_evaluations_per_video"], student.metrics["model_evaluations_per_video"]) == (64, 4)
    assert teacher.metrics["prompts_scored"] == 4
    assert "samples.gif" in {a.path for a in client.list_artifacts(by_name["student-4"].info.run_id)}
    text = summary_text(summary)
    assert "teacher-32" in text and "clipsim*" in text and summary["run_id"] in text

    # The same config again: the same runs, the same table (timings aside).
    def table():
        with open(output / "comparison.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k not in ("seconds_per_video", "speedup_vs_teacher")}
                    for r in csv.DictReader(f)]

    first = table()
    again = run_evaluate(load_config(EvaluateConfig, None, overrides, base={"output": str(output)}))
    assert again["run_id"] == summary["run_id"] and again["child_runs"] == summary["child_runs"]
    assert table() == first
    assert len(client.search_runs([experiment])) == 3
    assert client.get_run(again["run_id"]).info.status == "FINISHED"


@pytest.mark.slow
@pytest.mark.ray
def test_held_out_clips_from_a_curated_dataset(exported, curated_sample, tmp_path):
    from pipelines.evaluate import run_evaluate

    config = _config(exported, tmp_path, "max_videos=5", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                     data=str(curated_sample))
    summary = run_evaluate(config)
    assert summary["num_videos"] == 5 and summary["real"]["num_videos"] == 5
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(set(results["clip_ids"])) == 5 and all(results["prompts"])
    for row in summary["models"]:
        assert math.isfinite(row["frechet_clip_frame"]) and row["frechet_clip_frame"] > 0
        assert math.isfinite(row["motion_wasserstein"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    for run_id in summary["child_runs"].values():
        assert math.isfinite(client.get_run(run_id).data.metrics["untrained_frechet_clip_frame"])
    assert "real_flicker_mean" in client.get_run(summary["run_id"]).data.metrics
    # The held-out data is named by its version, in the config beside the outputs and in the run.
    parent = client.get_run(summary["run_id"]).data
    saved = yaml.safe_load((tmp_path / "evaluate-config.yaml").read_text())
    assert config.data == saved["data"] == f"{curated_sample}@v1"
    assert parent.params["data"] == config.data and parent.tags["reelforge.data_version"].startswith("v1-lance")
