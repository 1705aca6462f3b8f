"""The seeds' three-stage recipe in one `reelforge train` on a real local Ray cluster with real DeepSpeed (2 CPU
workers, ZeRO-2): image pretraining (an image folder, then the curated keyframes), video pretraining on the curated
set and fine-tuning on a percentile subset, each stage on its own data, and a run stopped inside the video stage
resumes there with the same data order (every later loss equals the uninterrupted run's)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.dataset import CuratedDataset
from pipelines.config import ConfigError, load_config
from pipelines.train import run_train
from training.config import TrainConfig

pytestmark = [pytest.mark.slow, pytest.mark.ray]

WHERE = "motion_mean >= p50(motion_mean)"
STEPS = {"images": 2, "keyframes": 2, "video": 3, "finetune": 3}
TOTAL = sum(STEPS.values())
BOUNDARY = STEPS["images"] + STEPS["keyframes"]  # the first step of the video stage (0-based)


def _config(data, output, folder, *sets: str) -> TrainConfig:
    curriculum = (
        f"curriculum=[{{name: images, steps: {STEPS['images']}, num_frames: 1, fps: 1.0, size: 8, source: images, "
        f"images: '{folder}'}}, {{name: keyframes, steps: {STEPS['keyframes']}, num_frames: 1, fps: 1.0, size: 8, "
        f"source: keyframes}}, {{name: video, steps: {STEPS['video']}, num_frames: 2, fps: 2.0, size: 8}}, "
        f"{{name: finetune, steps: {STEPS['finetune']}, num_frames: 2, fps: 2.0, size: 8, where: '{WHERE}'}}]")
    overrides = [curriculum, "checkpoint.every_steps=100", "sampling.every_steps=0", "tracking.log_every_steps=1",
                 "optim.warmup_steps=2", "deepspeed.micro_batch_size=2", "data_loading.prefetch_batches=1", *sets]
    return load_config(TrainConfig, None, overrides, base={"data": str(data), "output": str(output)})


def _history(summary: dict, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    out: dict[int, float] = {}
    for m in sorted(client.get_metric_history(summary["run_id"], key), key=lambda m: m.timestamp):
        out[m.step] = m.value  # a step logged again after a restore: the later value counts
    return out


@pytest.fixture(scope="module")
def image_folder(curated_sample, tmp_path_factory):
    """An image folder made of the curated clips' middle keyframes (JPEG), captioned through captions.jsonl."""
    clips = CuratedDataset(str(curated_sample)).read("clips", columns=["clip_id", "keyframes", "caption"],
                                                     filter="kept = true")
    folder = tmp_path_factory.mktemp("images")
    with (folder / "captions.jsonl").open("w") as captions:
        for row in clips.to_pylist()[:8]:
            (folder / f"{row['clip_id']}.jpg").write_bytes(row["keyframes"][1])
            captions.write(json.dumps({"file": f"{row['clip_id']}.jpg", "caption": row["caption"] or ""}) + "\n")
    return folder


def _expected_subset(curated_sample) -> tuple[float, set[str]]:
    """The fine-tuning subset computed here, independently of training/clip_subset.py."""
    clips = CuratedDataset(str(curated_sample)).read("clips", columns=["clip_id", "motion_mean"],
                                                     filter="kept = true").to_pylist()
    values = np.array([r["motion_mean"] for r in clips if r["motion_mean"] is not None], dtype=float)
    median = float(np.percentile(values[~np.isnan(values)], 50))
    return median, {r["clip_id"] for r in clips if r["motion_mean"] is not None and r["motion_mean"] >= median}


@pytest.fixture(scope="module")
def three_stage_run(curated_sample, image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-three-stage")
    summary = run_train(_config(curated_sample, out, image_folder))
    return out, summary


def test_each_stage_trains_on_its_own_data_in_one_run(curated_sample, three_stage_run):
    from mlflow.tracking import MlflowClient

    out, summary = three_stage_run
    assert summary["step"] == TOTAL and summary["model_version"]
    losses = _history(summary, "loss")
    assert sorted(losses) == list(range(1, TOTAL + 1)) and all(np.isfinite(list(losses.values())))
    # Each stage's loader opened at its first step, with its frames per sample and its number of items
    starts = {1: 0, 1 + STEPS["images"]: 1, 1 + BOUNDARY: 2, 1 + BOUNDARY + STEPS["video"]: 3}
    assert _history(summary, "stage_index") == starts
    assert _history(summary, "stage_frames") == {1: 1, 3: 1, 5: 2, 8: 2}
    items = _history(summary, "stage_items")
    kept = CuratedDataset(str(curated_sample)).read("shards", columns=["clip_id"])["clip_id"].to_pylist()
    assert items[1] == 8  # the image folder's 8 images
    assert items[3] == 3 * len(kept)  # first, middle and last keyframe of every kept clip
    assert items[5] == len(kept)  # one window of every kept clip (all are long enough for 2 frames at 2 fps)
    median, subset = _expected_subset(curated_sample)
    assert 0 < len(subset) < len(kept)
    assert items[8] == len(subset)  # the fine-tuning stage read the subset, not the whole set
    params = MlflowClient(tracking_uri=summary["tracking_uri"]).get_run(summary["run_id"]).data.params
    assert params["curriculum.3.clips"] == str(len(subset))
    assert params["curriculum.3.kept_clips"] == str(len(kept))
    assert params["curriculum.3.where"] == WHERE
    assert float(params["curriculum.3.where_resolved"].split(">=")[1]) == pytest.approx(median)
    assert params["curriculum.0.images"] == "8" and params["curriculum.1.source"] == "keyframes"
    assert "curriculum.2.source" not in params  # the plain video stage chose no data
    # the export records the curriculum with each stage's source
    exported = json.loads((out / "model" / "config.json").read_text())
    assert [s.get("source") for s in exported["curriculum"]] == ["images", "keyframes", "video", "video"]


def test_a_run_stopped_inside_the_video_stage_resumes_there_with_the_same_data(curated_sample, image_folder,
                                                                             three_stage_run, tmp_path):
    _, reference = three_stage_run
    out = tmp_path / "resumed"
    stop = BOUNDARY + 1  # one step into the video stage
    first = run_train(_config(curated_sample, out, image_folder, f"stop_after_steps={stop}"))
    assert first["step"] == stop and json.loads((out / "train_state.json").read_text())["stage"] == "video"
    resumed = run_train(_config(curated_sample, out, image_folder))
    assert resumed["step"] == TOTAL and resumed["run_id"] == first["run_id"]
    # the resumed workers reopened the video stage at its second step, and every loss after is the reference's
    assert _history(resumed, "stage_index")[stop + 1] == 2
    losses, expected = _history(resumed, "loss"), _history(reference, "loss")
    for s in range(1, TOTAL + 1):
        assert losses[s] == pytest.approx(expected[s], rel=1e-6, abs=1e-9), s
    # the image folder is not part of the dataset version: a changed one is refused on resume, with what changed
    captions = image_folder / "captions.jsonl"
    text = captions.read_text()
    captions.write_text(text.replace('"caption": "', '"caption": "changed ', 1))
    try:
        with pytest.raises(ConfigError, match=r"curriculum\[0\]'s image folder changed since the checkpoint"):
            run_train(_config(curated_sample, out, image_folder))
    finally:
        captions.write_text(text)


def test_a_bad_stage_expression_fails_before_any_worker_starts(curated_sample, image_folder, tmp_path):
    config = _config(curated_sample, tmp_path / "bad", image_folder)
    config.curriculum[3].where = "motion_mean >= p50(motoin_mean)"
    with pytest.raises(ConfigError, match=r"^curriculum\[3\] \(finetune\): p50\(motoin_mean\): 'motoin_mean' is "
                                          "not a column of the clips table"):
        run_train(config)
    assert not (tmp_path / "bad").exists()  # no output, no MLflow run, no Ray Train
