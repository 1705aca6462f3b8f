"""`reelforge generate` on tiny exported models: files, metadata, sidecars, determinism, batching, resume, students,
bad inputs, and models resolved from a real local MLflow store (models:/ and runs:/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from model_exports import export_random_model
from PIL import Image, ImageSequence

from models.text_encoder import TextEncoderConfig
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
FRAMES, SIZE, FPS = 4, 16, 4.0
PROMPT = "a red triangle moving right on a black background"


def _export(directory: Path, seed: int, sampling: dict, **extra) -> Path:
    stage = {"name": "base", "steps": 10, "num_frames": FRAMES, "fps": FPS, "size": SIZE}
    return export_random_model(directory, seed, sampling, [stage], steps=10, codec="pixels",
                               text_encoder=TextEncoderConfig(model_name="tiny"), **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    teacher = _export(root / "train" / "model", 0, {"num_steps": 3, "cfg_scale": 3.0})
    student = _export(root / "distill" / "model", 1, {"num_steps": 2, "cfg_scale": 1.0}, distilled_from=str(teacher),
                      round=1)
    return {"teacher": teacher, "student": student}


def _decode(path: Path) -> tuple[np.ndarray, dict, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, dict(container.metadata), float(stream.average_rate)


def _gif(path: Path) -> np.ndarray:
    """The frames of a GIF: exact pixels, unlike the MP4's lossy H.264, whose bytes libx264 does not always reproduce
    for identical frames (seen here: two encodings of the same 16x16 frames alternating between test runs)."""
    with Image.open(path.with_suffix(".gif")) as gif:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])


def _run(*args: str) -> int:
    return main(["generate", *map(str, args)])


def _sidecar(video: Path) -> dict:
    return json.loads(video.with_suffix(".json").read_text())


def test_single_prompt_writes_a_playable_mp4_with_metadata_and_sidecar(models, tmp_path):
    out = tmp_path / "one.mp4"
    assert _run("--model", models["teacher"], "--prompt", PROMPT, "--seed", "7", "--out", out, "--gif") == 0
    frames, metadata, fps = _decode(out)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and fps == FPS
    assert metadata["title"] == PROMPT
    comment = json.loads(metadata["comment"])
    assert comment["seed"] == 7 and comment["model"] == str(models["teacher"].resolve())
    sidecar = _sidecar(out)
    assert (sidecar["prompt"], sidecar["seed"], sidecar["model"]) == (PROMPT, 7, str(models["teacher"].resolve()))
    assert (sidecar["steps"], sidecar["cfg_scale"]) == (3, 3.0)  # the teacher's config.json
    assert (sidecar["num_frames"], sidecar["width"], sidecar["height"], sidecar["fps"]) == (FRAMES, SIZE, SIZE, FPS)
    assert sidecar["seconds"] == FRAMES / FPS and len(sidecar["model_sha256"]) == 64
    assert sidecar["files"] == ["one.mp4", "one.gif"]
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.n_frames == FRAMES and gif.size == (SIZE, SIZE) and PROMPT in gif.info["comment"].decode()


def test_same_seed_same_frames_other_seed_other_frames(models, tmp_path):
    paths = {name: tmp_path / f"{name}.mp4" for name in ("a", "b", "c")}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert _run("--model", models["teacher"], "--prompt", PROMPT, "--seed", seed, "--out", paths[name],
                    "--gif") == 0
        assert _decode(paths[name])[0].shape == (FRAMES, SIZE, SIZE, 3)
    a, b, c = (_gif(p) for p in paths.values())
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_prompts_file_is_batched_resumed_and_independent_of_batching(models, tmp_path):
    prompts = [PROMPT, "a blue circle moving left on a grey background", "a yellow square moving up",
               "a white square moving down", "a green circle"]
    listing = tmp_path / "prompts.txt"
    listing.write_text("\n".join(prompts[:3]) + "\n\n")  # a blank line is not a prompt
    out = tmp_path / "videos"
    assert _run("--model", models["student"], "--prompts-file", listing, "--batch", 2, "--seed", 10, "--out", out,
                "--gif") == 0
    first = sorted(out.glob("*.mp4"))
    assert len(first) == 3 and len(list(out.glob("*.json"))) == 3 and len(list(out.glob("*.gif"))) == 3
    assert [_sidecar(p)["seed"] for p in first] == [10, 11, 12]  # prompt i uses seed + i
    assert [_sidecar(p)["prompt"] for p in first] == prompts[:3]
    mtimes = {p: p.stat().st_mtime_ns for p in first}

    # a killed run rerun with the whole file: what is done is skipped, the rest is generated
    first[-1].with_suffix(".json").unlink()  # as if killed before its sidecar was written
    listing.write_text("\n".join(prompts) + "\n")
    from pipelines.generate import GenerateConfig, run_generate

    summary = run_generate(GenerateConfig(model=str(models["student"]), out=str(out), prompts_file=str(listing),
                                          batch=2, seed=10, gif=True))
    assert (summary["generated"], summary["skipped"]) == (3, 2)
    videos = sorted(out.glob("*.mp4"))
    assert len(videos) == 5 and all(p.stat().st_mtime_ns == mtimes[p] for p in first[:2])

    # each video depends on its prompt and seed, not on its batch: prompt 3 alone gives the same frames
    alone = tmp_path / "alone.mp4"
    assert _run("--model", models["student"], "--prompt", prompts[3], "--seed", 13, "--out", alone, "--gif") == 0
    assert np.array_equal(_gif(alone), _gif(videos[3]))

    # the same directory with other settings is refused, not silently mixed
    assert _run("--model", models["student"], "--prompts-file", listing, "--seed", 10, "--steps", 3, "--out",
                out, "--gif") == 2


def test_student_uses_its_distilled_sampling_unless_told(models, tmp_path):
    default, told = tmp_path / "default.mp4", tmp_path / "told.mp4"
    assert _run("--model", models["student"], "--prompt", PROMPT, "--out", default) == 0
    assert (_sidecar(default)["steps"], _sidecar(default)["cfg_scale"]) == (2, 1.0)
    assert _run("--model", models["student"], "--prompt", PROMPT, "--steps", 3, "--cfg", 2, "--out", told) == 0
    assert (_sidecar(told)["steps"], _sidecar(told)["cfg_scale"]) == (3, 2.0)


def test_negative_prompt_and_non_square_size(models, tmp_path):
    plain, negative, wide = tmp_path / "plain.mp4", tmp_path / "negative.mp4", tmp_path / "wide.mp4"
    assert _run("--model", models["teacher"], "--prompt", PROMPT, "--out", plain, "--gif") == 0
    assert _run("--model", models["teacher"], "--prompt", PROMPT, "--negative-prompt", "blue", "--out", negative,
                "--gif") == 0
    assert _sidecar(negative)["negative_prompt"] == "blue"
    assert not np.array_equal(_gif(plain), _gif(negative))
    assert _run("--model", models["teacher"], "--prompt", PROMPT, "--size", "24x16", "--num-frames", 2,
                "--out", wide) == 0
    assert _decode(wide)[0].shape == (2, 16, 24, 3)


@pytest.mark.parametrize("case", ["missing model", "empty prompts file", "bad size", "odd size", "file for many"])
def test_bad_inputs_exit_2_with_one_line(models, tmp_path, capsys, case):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    many = tmp_path / "many.txt"
    many.write_text("a\nb\n")
    args = {"missing model": ["--model", tmp_path / "nowhere", "--prompt", PROMPT],
            "empty prompts file": ["--model", models["teacher"], "--prompts-file", empty],
            "bad size": ["--model", models["teacher"], "--prompt", PROMPT, "--size", "wide"],
            "odd size": ["--model", models["teacher"], "--prompt", PROMPT, "--size", "15x16"],
            "file for many": ["--model", models["teacher"], "--prompts-file", many]}[case]
    assert _run(*args, "--out", tmp_path / "out.mp4") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("reelforge generate: error:"), err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.slow
def test_the_command_in_a_subprocess(models, tmp_path):
    out = tmp_path / "videos"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(models["student"]),
                           "--prompt", PROMPT, "--out", str(out), "--gif", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 generated, 0 already done" in done.stdout
    assert "batch 1/1: 1/1 videos done" in done.stderr  # progress on stderr
    assert len(list(out.glob("*.mp4"))) == 1 and len(list(out.glob("*.gif"))) == 1
    bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(tmp_path / "nowhere"),
                          "--prompt", PROMPT, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.slow
def test_models_and_runs_uris_from_a_local_mlflow_store(models, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import experiment_id

    monkeypatch.chdir(tmp_path)  # a store MLflow would default to lands here, not in the repository
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(experiment_id(client, "reelforge-test", uri)).info.run_id
    client.log_artifacts(run_id, str(models["student"]), "model")  # as pipelines.train._register does
    client.create_registered_model("reelforge-vdit-student")
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    version = client.create_model_version("reelforge-vdit-student", source, run_id=run_id)
    assert str(version.version) == "1"
    client.set_registered_model_alias("reelforge-vdit-student", "steps-2", "1")  # as distill's `steps-N` aliases

    local = tmp_path / "local.mp4"
    assert _run("--model", models["student"], "--prompt", PROMPT, "--out", local, "--gif") == 0
    cache = tmp_path / "cache"
    for model_uri, name in (("models:/reelforge-vdit-student/1", "registered.mp4"),
                            ("models:/reelforge-vdit-student@steps-2", "alias.mp4"),
                            (f"runs:/{run_id}/model", "run.mp4")):
        out = tmp_path / name
        assert _run("--model", model_uri, "--tracking-uri", uri, "--cache-dir", cache, "--prompt", PROMPT,
                    "--out", out, "--gif") == 0
        frames, metadata, _ = _decode(out)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        assert json.loads(metadata["comment"])["model"] == model_uri and _sidecar(out)["model"] == model_uri
        assert _sidecar(out)["model_sha256"] == _sidecar(local)["model_sha256"]
        assert np.array_equal(_gif(out), _gif(local))
    cached = sorted((cache / "models").iterdir())
    assert len(cached) == 3
    # a numbered version is downloaded once, then read from the cache; an unknown version is a one-line error
    inodes = [p.stat().st_ino for p in cached]
    assert _run("--model", "models:/reelforge-vdit-student/1", "--tracking-uri", uri, "--cache-dir", cache,
                "--prompt", PROMPT, "--out", tmp_path / "again.mp4") == 0
    assert [p.stat().st_ino for p in sorted((cache / "models").iterdir())] == inodes
    assert _run("--model", "models:/reelforge-vdit-student/9", "--tracking-uri", uri, "--cache-dir", cache,
                "--prompt", PROMPT, "--out", tmp_path / "nine.mp4") == 2


def test_seeded_noise_is_what_generate_draws_for_one_prompt():
    from training.generate import seeded_noise

    noise = seeded_noise([5, 6], 3, FRAMES, SIZE, 2 * SIZE)
    assert noise.shape == (2, 3, FRAMES, SIZE, 2 * SIZE)
    for i, seed in enumerate((5, 6)):
        expected = torch.randn((1, 3, FRAMES, SIZE, 2 * SIZE), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(noise[i:i + 1], expected)


@pytest.mark.slow
def test_ray_job_writes_what_a_local_run_writes(models, tmp_path, ray_cluster):
    """`--ray` with two actors on a real local Ray cluster: every prompt's files, frames and request equal the local
    run's (each video's noise comes from its own seed), and a rerun skips what the job wrote."""
    prompts = [PROMPT, "a blue circle moving left on a grey background", "a yellow square moving up",
               "a white square moving down", "a green circle"]
    listing = tmp_path / "prompts.txt"
    listing.write_text("\n".join(prompts) + "\n")
    local, distributed = tmp_path / "local", tmp_path / "ray"
    assert _run("--model", models["student"], "--prompts-file", listing, "--seed", 3, "--out", local, "--gif") == 0
    assert _run("--model", models["student"], "--prompts-file", listing, "--seed", 3, "--out", distributed, "--gif",
                "--ray", "--workers", 2, "--batch", 2) == 0
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in distributed.iterdir()) and len(names) == 15
    for video in sorted(local.glob("*.mp4")):
        twin = distributed / video.name
        assert _decode(twin)[0].shape == (FRAMES, SIZE, SIZE, 3)
        assert np.array_equal(_gif(video), _gif(twin))
        timing = ("generation_seconds", "device", "batch_size")
        assert {k: v for k, v in _sidecar(video).items() if k not in timing} == \
            {k: v for k, v in _sidecar(twin).items() if k not in timing}
    from pipelines.generate import GenerateConfig, run_generate

    again = run_generate(GenerateConfig(model=str(models["student"]), out=str(distributed), prompts_file=str(listing),
                                        seed=3, gif=True, ray=True, ray_workers=2))
    assert (again["generated"], again["skipped"]) == (0, 5)
