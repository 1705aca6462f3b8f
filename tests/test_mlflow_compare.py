"""Runs that compare at a glance in the MLflow UI (issue 16 item 6), read back from a real SQLite store the way the UI
reads it: a teacher and a student exported and registered as train and distill leave them, evaluated on a held-out
curated version (written here by the curation writer, no Ray), under a workflow parent run.

What is checked: the same metric names in every model's run and <metric>/<model> on the evaluate and the workflow
runs with the speedup against the teacher; untrained_ before metrics from untrained weights; params equal to what ran;
durations covering generation; dataset inputs whose digest is the version's fingerprint; lineage tags with run ids
and models:/ URIs; model versions carrying their evaluation; samples.gif in every model's run, labelled and at least
64 px per clip; the speed-vs-quality chart."""

from __future__ import annotations

import io
import math
from pathlib import Path

import av
import numpy as np
import pytest
from model_exports import export_random_model
from PIL import Image

from curation.config import CurateConfig, FilterConfig, ScoreFilter
from curation.dataset import CuratedDataset
from curation.sample_dump import _Sampler
from curation.writer import BatchCommitter, create_tables, finish_filters, tag_version
from pipelines import lineage, tracking
from pipelines.config import load_config
from training.dataset import ClipTable
from training.evaluate import DEFAULT_PROMPTS, EvaluateConfig
from training.publish import publish_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

FRAMES, SIZE, FPS = 4, 16, 4.0
NATIVE = [{"name": "high", "steps": 10, "num_frames": FRAMES, "fps": FPS, "size": SIZE}]
KEEP_ALL = CurateConfig(filters=FilterConfig(duration=ScoreFilter(), motion=ScoreFilter(), aesthetic=ScoreFilter(),
                                             caption_match=ScoreFilter()))
CELL_PX = 64


def _mp4(frames: list[np.ndarray], fps: int) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _curated(root: Path, clips: int, seed: int) -> str:
    """One curated version of sample-dump shots (8 frames at 4 fps, 32 px, captions true to the pixels), written
    the way `reelforge curate` writes it."""
    sampler = _Sampler(np.random.default_rng(seed), 32, 32, int(FPS))
    dataset = CuratedDataset(str(root))
    create_tables(dataset)
    committer = BatchCommitter(dataset, 1, every=4)
    for n in range(clips):
        shot = sampler.shot("moving", 0, 7, 0, 7, None)
        frames = [shot.render(i, 32, 32, sampler.radius) for i in range(8)]
        row = {"clip_id": f"clip-{n:03d}", "video_id": f"video-{n}", "start_frame": 0, "end_frame": 7,
               "start_s": 0.0, "end_s": 2.0, "num_frames": 8, "caption": shot.caption, "drop_reason": None,
               "width": 32, "height": 32, "video_bytes": _mp4(frames, int(FPS))}
        committer.add({"video_id": f"video-{n}", "uri": f"/videos/{n}.mp4", "size_bytes": 1000, "status": "ok",
                       "error_class": None, "error_message": None, "fps": FPS, "width": 32, "height": 32,
                       "duration_s": 2.0, "num_frames": 8, "clips": [row]})
    committer.flush()
    written = finish_filters(dataset, KEEP_ALL, 1, [])
    tag_version(dataset, 1, {"dataset_version": 1, "counts": written.counts})
    return str(root)


def _export(directory: Path, seed: int, sampling: dict, **extra) -> Path:
    return export_random_model(directory, seed, sampling, NATIVE, **extra)


def _trained(uri: str, parent: str, output: Path, export: Path, registered: str, table: ClipTable,
             extra_tags: dict | None = None) -> tuple[str, str]:
    """What pipelines/train.py leaves: the export published under OUTPUT (model -> models/<sha16>), the run whose id
    OUTPUT keeps, reading `table`, and the registered version tagged with the data it was trained on."""
    publish_model(export, str(output))
    _, run_id = tracking.output_run(str(output), uri, "reelforge", {"reelforge.step": "train"}, parent)
    client = tracking.client_for(uri)
    tracking.log_dataset_input(client, run_id, table, "training")
    try:
        client.create_registered_model(registered)
    except Exception:  # noqa: BLE001 - it exists
        pass
    tags = {"data": table.data_uri, "data_version": table.version, "run_id": run_id, **(extra_tags or {})}
    version = client.create_model_version(registered, str(output / "model"), run_id=run_id, tags=tags).version
    tracking.finish_run(uri, run_id)
    return run_id, str(version)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> dict:
    from pipelines.evaluate import run_evaluate

    root = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    train_data = ClipTable.open(_curated(root / "curated", 6, seed=0))
    heldout = ClipTable.open(_curated(root / "heldout-curated", 4, seed=1))
    parent = tracking.open_run(uri, "reelforge", run_name="quickstart", tags={"reelforge.step": "workflow"})
    teacher_run, teacher_version = _trained(
        uri, parent, root / "train", _export(root / "exports" / "teacher", 0, {"num_steps": 8, "cfg_scale": 3.0}),
        "reelforge-vdit", train_data)
    teacher_folder = (root / "train" / "model").resolve()  # models/<sha16>, as distill records its teacher
    student_run, student_version = _trained(
        uri, parent, root / "distill" / "round-1-2steps",
        _export(root / "exports" / "student", 1, {"num_steps": 2, "cfg_scale": 1.0},
                distilled_from=str(teacher_folder), round=1),
        "reelforge-vdit-student", train_data, {"distilled_from_uri": f"models:/reelforge-vdit/{teacher_version}"})
    config = load_config(EvaluateConfig, None, [
        f"models=[{{path: {root / 'train'}}}, {{path: {root / 'distill' / 'round-1-2steps' / 'model'}}}]",
        f"tracking.uri={uri}", "tracking.experiment=reelforge", f"tracking.parent_run_id={parent}",
        "max_videos=4", "grid_prompts=4", f"gif_cell_px={CELL_PX}"],
        base={"output": str(root / "evaluate"), "data": heldout.data_uri})
    summary = run_evaluate(config)
    client = tracking.client_for(uri)
    lineage.record_step(client, parent, "curate", {"dataset_version": 1, "output": str(root / "curated")})
    lineage.record_step(client, parent, "evaluate", summary)
    tracking.finish_run(uri, parent)
    return {"root": root, "uri": uri, "client": client, "summary": summary, "parent": parent,
            "train_data": train_data, "heldout": heldout, "teacher_run": teacher_run,
            "teacher_version": teacher_version, "student_run": student_run, "student_version": student_version}


def _children(compared) -> dict:
    client, summary = compared["client"], compared["summary"]
    return {name: client.get_run(run_id) for name, run_id in summary["child_runs"].items()}


def test_every_model_run_has_the_same_metric_names_and_the_parents_have_them_per_model(compared):
    children = _children(compared)
    assert list(children) == ["teacher-8", "student-2"]
    teacher, student = (children[n].data.metrics for n in children)
    assert set(teacher) == set(student)
    # From the untrained tiny CLIP: the name says so; settings are params, not metrics (no duplicate in the plots).
    assert {"untrained_clipsim_mean", "untrained_frechet_clip_frame", "both_accuracy", "seconds_per_video",
            "speedup_vs_teacher", "model_evaluations_per_video"} <= set(teacher)
    assert not {"clipsim_mean", "frechet_clip_frame", "num_steps", "cfg_scale"} & set(teacher)
    assert teacher["speedup_vs_teacher"] == pytest.approx(1.0)
    assert student["speedup_vs_teacher"] == pytest.approx(teacher["seconds_per_video"] / student["seconds_per_video"])
    assert student["speedup_vs_teacher"] > 1  # 2 network evaluations per video against 16
    client = compared["client"]
    evaluate_run = client.get_run(compared["summary"]["run_id"]).data.metrics
    workflow_run = client.get_run(compared["parent"]).data.metrics
    for name, run in children.items():
        for metric, value in run.data.metrics.items():
            if metric not in ("num_videos", "prompts_scored"):
                assert evaluate_run[f"{metric}/{name}"] == pytest.approx(value)
                assert workflow_run[f"{metric}/{name}"] == pytest.approx(value)
    assert "real_untrained_clipsim_mean" in evaluate_run and "real_both_accuracy" in evaluate_run


def test_params_are_what_ran(compared):
    client, summary, heldout = compared["client"], compared["summary"], compared["heldout"]
    params = client.get_run(summary["run_id"]).data.params
    assert (params["models.0.name"], params["models.0.num_steps"], params["models.0.cfg_scale"]) == (
        "teacher-8", "8", "3.0")
    assert (params["models.1.name"], params["models.1.num_steps"], params["models.1.cfg_scale"]) == (
        "student-2", "2", "1.0")
    assert params["models.0.path"] == str(compared["root"] / "train" / "model")
    assert (params["num_frames"], params["size"], params["fps"]) == (str(FRAMES), str(SIZE), str(FPS))
    assert not [k for k, v in params.items() if k.startswith("models.") and v in ("", "None")]
    # 4 held-out captions were the prompts, not the default list
    assert "4 held-out clips" in params["prompts"] and DEFAULT_PROMPTS[0] not in params["prompts"]
    assert params["data"] == heldout.data_uri
    for name, run in _children(compared).items():
        row = next(m for m in summary["models"] if m["model"] == name)
        assert (run.data.params["num_steps"], run.data.params["cfg_scale"]) == (
            str(int(row["num_steps"])), str(row["cfg_scale"]))
        # no file path among a model run's params (an axis of the compare page's default plot): it is a tag
        assert not [v for v in run.data.params.values() if v.startswith("/")]
        assert run.data.tags["reelforge.model_path"] == row["path"]


def test_each_model_run_lasts_its_generation_not_its_logging(compared):
    for name, run in _children(compared).items():
        row = next(m for m in compared["summary"]["models"] if m["model"] == name)
        generating = row["seconds_per_video"] * row["num_videos"]
        assert (run.info.end_time - run.info.start_time) / 1000 >= generating > 0


def test_dataset_inputs_carry_the_versions_fingerprint(compared):
    client, heldout, train_data = compared["client"], compared["heldout"], compared["train_data"]

    def inputs(run_id: str) -> list:
        return client.get_run(run_id).inputs.dataset_inputs

    (evaluation,) = inputs(compared["summary"]["run_id"])
    assert evaluation.dataset.digest == heldout.version and evaluation.dataset.name == "heldout-curated@v1"
    assert {t.key: t.value for t in evaluation.tags}["mlflow.data.context"] == "evaluation"
    assert '"num_rows": 4' in evaluation.dataset.profile and "caption" in evaluation.dataset.schema
    for run_id in (compared["parent"], compared["teacher_run"], compared["student_run"]):
        (training,) = inputs(run_id)
        assert training.dataset.digest == train_data.version and training.dataset.name == "curated@v1"
    assert client.get_run(compared["parent"]).data.tags["reelforge.data_version"] == train_data.version


def test_lineage_tags_and_model_versions_carry_their_evaluation(compared):
    client, summary = compared["client"], compared["summary"]
    children = _children(compared)
    teacher, student = children["teacher-8"].data.tags, children["student-2"].data.tags
    teacher_uri = f"models:/reelforge-vdit/{compared['teacher_version']}"
    assert teacher["reelforge.model_uri"] == teacher_uri and teacher["reelforge.source_run_id"] == compared[
        "teacher_run"]
    assert student["reelforge.model_uri"] == f"models:/reelforge-vdit-student/{compared['student_version']}"
    assert student["reelforge.distilled_from"] == teacher_uri  # a URI, not the folder it was read from
    assert teacher["reelforge.trained_on_data_version"] == compared["train_data"].version
    assert teacher["scores_untrained"] == "true" and "clipsim_mean" in teacher["untrained_metrics"]
    workflow = client.get_run(compared["parent"]).data.tags
    assert workflow["reelforge.evaluate.run_id"] == summary["run_id"]
    assert f"teacher-8={teacher_uri}" in workflow["reelforge.evaluate.model_uris"]
    for name, version, run in (("reelforge-vdit", compared["teacher_version"], children["teacher-8"]),
                               ("reelforge-vdit-student", compared["student_version"], children["student-2"])):
        tags = client.get_model_version(name, version).tags
        assert tags["eval.run_id"] == run.info.run_id and tags["eval.data_version"] == compared["heldout"].version
        assert float(tags["eval.both_accuracy"]) == pytest.approx(run.data.metrics["both_accuracy"], abs=1e-4)
        assert math.isclose(float(tags["eval.speedup_vs_teacher"]), run.data.metrics["speedup_vs_teacher"],
                            rel_tol=1e-3)
        assert "untrained_clipsim_mean" in tags["eval.untrained_metrics"]


def _dark_rows(picture: np.ndarray) -> np.ndarray:
    """Rows of an RGB picture holding dark (text) pixels."""
    return np.nonzero((picture.max(axis=2) < 100).any(axis=1))[0]


def test_samples_gif_under_one_name_labelled_and_readable(compared, tmp_path):
    client = compared["client"]
    for name, run in _children(compared).items():
        assert "samples.gif" in {a.path for a in client.list_artifacts(run.info.run_id)}
        local = client.download_artifacts(run.info.run_id, "samples.gif", str(tmp_path / name))
        with Image.open(local) as gif:
            frame = np.asarray(gif.convert("RGB"))
            width, height = gif.size
        # 4 prompts in one row of 64 px clips (16 px enlarged 4x), a title above and each prompt below
        assert width == 4 * (CELL_PX + 2) - 2 and height > CELL_PX
        title = _dark_rows(frame[:, :width])
        assert title.min() < 13  # the title line: the model's name
        under = frame[height - (height - CELL_PX) // 2:]  # the lower part of the label band
        assert len(_dark_rows(under)) > 0
    grid = client.download_artifacts(compared["summary"]["run_id"], "grid.gif", str(tmp_path / "grid"))
    with Image.open(grid) as gif:
        frame = np.asarray(gif.convert("RGB"))
    # 2 model rows of 64 px cells, with their names in the left band, and the prompts on top
    assert frame.shape[0] >= 2 * CELL_PX and frame.shape[1] >= 4 * CELL_PX + 100
    assert len(_dark_rows(frame[:, :100])) > 2 * 13  # model labels, several lines for each row


def test_speed_vs_quality_chart_on_the_evaluate_and_the_workflow_run(compared, tmp_path):
    client = compared["client"]
    assert "speed_vs_quality.png" in {a.path for a in client.list_artifacts(compared["summary"]["run_id"])}
    assert "evaluate/speed_vs_quality.png" in {a.path for a in client.list_artifacts(compared["parent"], "evaluate")}
    local = client.download_artifacts(compared["summary"]["run_id"], "speed_vs_quality.png", str(tmp_path))
    with Image.open(local) as chart:
        assert chart.size == (900, 550)


def test_curate_run_names_differ_between_the_training_and_held_out_data():
    from pipelines.curate import curate_run_name

    assert curate_run_name("/w/curated", 1) == "curate-curated-v0001"
    assert curate_run_name("/w/heldout-curated", 1) == "curate-heldout-curated-v0001"
    assert curate_run_name("s3://user:secret@bucket/data/", 2) == "curate-data-v0002"


def test_distill_summary_tags_the_students_uris():
    summary = {"run_id": "r", "rounds": [
        {"finished": True, "registered_model": "reelforge-vdit-student", "model_version": "3", "steps": 16},
        {"finished": True, "registered_model": "reelforge-vdit-student", "model_version": "4", "steps": 8}]}
    tags = lineage.step_tags("distill", summary)
    assert tags == {"reelforge.distill.run_id": "r", "reelforge.distill.model_uris":
                    "models:/reelforge-vdit-student/3,models:/reelforge-vdit-student/4"}
