"""A latent model samples, decodes, distils and evaluates (issue 14): a tiny random reelforge causal VAE (4x in time
and space, so 5 frames -> 2 latent frames, 16 px -> 4) is the codec of a latent cache; a VDiT trains on the cache for
a few steps on Ray Train + DeepSpeed, one distillation round reads the same cache, evaluation samples both models at
the latent shape and decodes through the VAE, and `reelforge generate` writes the decoded video. The VAE is untrained:
its videos mean nothing, only shapes, codecs and bookkeeping are checked."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from encode_here import encode_here
from test_dataset import VERSION_1, _write_version

from models.causal_vae import CausalVAE, CausalVAEConfig
from models.codec import CodecConfig, build_codec
from pipelines.config import load_config
from training.config import ConfigError
from training.latent_encode import EncodeConfig

ROOT = Path(__file__).resolve().parents[1]
STAGE = "{name: clip, steps: 3, num_frames: 5, fps: 8.0, size: 16}"  # 1 + 4k frames for the VAE's 4x in time
LATENT = (4, 2, 4, 4)  # (channels, frames, height, width) of one clip of STAGE through the VAE


def test_the_latent_workflow_hands_the_trained_vae_to_encode_and_train():
    from pipelines.workflow import WorkflowConfig, _hand_down_codec, _validate_steps

    config = load_config(WorkflowConfig, ROOT / "configs" / "quickstart-latent.yaml", [])
    assert config.steps == ["curate", "train-vae", "encode", "train", "distill", "evaluate"]
    _validate_steps(config)
    _hand_down_codec(config, {"train-vae": Path("/w/vae")})
    assert (config.train.codec.kind, config.train.codec.model) == ("reelforge-vae", "/w/vae/vae")
    # the cache is made with what train reads: its codec, text tower and clip shapes
    assert config.encode.codec == config.train.codec and config.encode.text == config.train.text
    assert config.encode.curriculum == config.train.curriculum
    stage = config.train.curriculum[-1]
    assert build_codec(CodecConfig()).frame_count_ok(stage.num_frames) and (stage.num_frames - 1) % 4 == 0
    clash = load_config(WorkflowConfig, ROOT / "configs" / "quickstart-latent.yaml", ["encode.text.context_length=8"])
    with pytest.raises(ConfigError, match=r"^encode.text: the workflow takes it from train.text"):
        _hand_down_codec(clash, {"train-vae": Path("/w/vae")})


def test_a_latent_teachers_round_takes_its_codec_and_reads_the_cache_under_its_stage_name():
    from training.distill import DistillConfig, round_train_config

    vae = {"kind": "reelforge-vae", "model": "/w/vae/vae", "revision": "", "subfolder": "", "vae_class": "",
           "sha256": {}, "tiling": False, "tile_size": None, "slicing": False, "dtype": "float32"}
    teacher = {"preset": "VDiT-T/2", "model": {"in_channels": 8}, "text": {}, "schedule": {}, "codec_config": vae,
               "curriculum": [{"name": "video", "steps": 9, "num_frames": 5, "fps": 2.0, "size": 32}]}
    cached = round_train_config(DistillConfig(data="/w/latents"), teacher, 16, "/w/out", cached=True)
    assert (cached.codec.kind, cached.codec.model, cached.codec.device) == ("reelforge-vae", "/w/vae/vae", "cpu")
    assert cached.curriculum[0].name == "video"  # the cache's stage: its windows are stored under that name
    decoded = round_train_config(DistillConfig(data="/w/curated"), teacher, 16, "/w/out")
    # from curated video the frames are encoded through the teacher's codec in the step
    assert decoded.codec == cached.codec and decoded.curriculum[0].name == "distill-16"
    shape = decoded.curriculum[0]
    assert (shape.num_frames, shape.fps, shape.size, shape.steps) == (5, 2.0, 32, 300)
    pixel = round_train_config(DistillConfig(), {**teacher, "codec_config": None}, 16, "/w/out")
    assert pixel.codec.kind == "pixels"  # an export from before codecs were recorded is a pixel model


@pytest.fixture(scope="module")
def latent_run(ray_cluster, tmp_path_factory) -> dict:
    """Curated clips -> latent cache -> a trained latent teacher -> one distillation round from the cache."""
    from pipelines.distill import run_distill
    from pipelines.train import run_train
    from training.config import TrainConfig
    from training.distill import DistillConfig

    root = tmp_path_factory.mktemp("latent-e2e")
    torch.manual_seed(0)
    CausalVAE(CausalVAEConfig(latent_channels=4, block_channels=[8, 8, 8], time_compression=4, space_compression=4,
                              norm_groups=4)).save_pretrained(root / "vae")
    codec = {"kind": "reelforge-vae", "model": str(root / "vae")}
    _write_version(root / "curated", 1, VERSION_1)
    encode_here(load_config(EncodeConfig, None, [f"curriculum=[{STAGE}]", "commit_clips=8"],
                             base={"data": f"{root / 'curated'}@v1", "output": str(root / "latents"),
                                   "codec": codec}))
    small = ["deepspeed.micro_batch_size=2", "scaling.num_workers=1", "tracking.log_every_steps=1",
             "optim.warmup_steps=1", "checkpoint.every_steps=100"]
    train = load_config(TrainConfig, None, [f"curriculum=[{STAGE}]", "sampling.every_steps=0", "sampling.num_steps=2",
                                            "sampling.cfg_scale=2.0", "sampling.prompts=[a red circle]", *small],
                        base={"data": str(root / "latents"), "output": str(root / "train"), "codec": codec})
    trained = run_train(train)
    distill = load_config(DistillConfig, None, ["teacher_steps=2", "final_steps=1", "steps_per_round=2", *small],
                          base={"teacher": trained["model"], "data": str(root / "latents"),
                                "output": str(root / "distill")})
    distilled = run_distill(distill)
    return {"root": root, "codec": build_codec(CodecConfig(**codec)), "train": trained, "distill": distilled}


@pytest.mark.slow
@pytest.mark.ray
def test_the_teacher_trains_on_the_cache_and_the_student_distils_from_it(latent_run):
    codec, trained, distilled = latent_run["codec"], latent_run["train"], latent_run["distill"]
    assert trained["model_version"] is not None and trained["data_version"].startswith("latents-v1-")
    teacher = json.loads((Path(trained["model"]) / "config.json").read_text())
    assert teacher["codec"] == codec.id != "pixels" and teacher["model"]["in_channels"] == LATENT[0]
    assert distilled["finished"] and [r["steps"] for r in distilled["rounds"]] == [1]
    student_dir = Path(distilled["rounds"][0]["model"])
    student = json.loads((student_dir / "config.json").read_text())
    # the student denoises the teacher's latents, and its round read the cache (its stage kept the cache's name)
    assert student["codec"] == codec.id and student["codec_config"] == teacher["codec_config"]
    assert student["curriculum"][0]["name"] == "clip"
    assert Path(student["distilled_from"]).resolve() == Path(trained["model"]).resolve()
    round_config = (student_dir.parent / "train-config.yaml").read_text()
    assert "latents" in round_config and "reelforge-vae" in round_config


@pytest.mark.slow
@pytest.mark.ray
def test_evaluation_samples_latents_and_scores_decoded_videos(latent_run, tmp_path):
    from training.evaluate import EvaluateConfig, ModelSpec, VideoFormat, evaluate, latent_format
    from training.export import load_model

    root = latent_run["root"]
    teacher, student = latent_run["train"]["model"], latent_run["distill"]["rounds"][0]["model"]
    config = EvaluateConfig(models=[ModelSpec(path=teacher), ModelSpec(path=student)], data=str(root / "curated"),
                            max_videos=3, device="cpu", output=str(tmp_path))
    result = evaluate(config)
    assert [m.name for m in result.models] == ["teacher-2", "student-1"]
    fmt = result.format
    assert (fmt.num_frames, fmt.size) == (5, 16)
    assert latent_format(load_model(teacher), fmt) == LATENT  # sampled at the latent shape
    with pytest.raises(ValueError, match=r"cannot take 4 frames of 16 px \(a causal VAE takes 1 \+ 4k frames"):
        latent_format(load_model(teacher), VideoFormat(4, 16, 8.0))
    for model in result.models:
        assert model.videos.shape == (3, 5, 16, 16, 3) and model.videos.dtype == np.uint8  # decoded pixels
        assert np.isfinite(model.metrics["frechet_clip_frame"]) and model.metrics["seconds_per_video"] > 0
    # prompt i from seed + i: the teacher's first video again, alone, is the same video
    again = evaluate(EvaluateConfig(models=[ModelSpec(path=teacher)], data=str(root / "curated"), max_videos=2,
                                    device="cpu", output=str(tmp_path / "again")))
    assert np.array_equal(again.models[0].videos[0], result.models[0].videos[0])


def _pixel_model(folder: Path) -> str:
    from models.schedules import ScheduleConfig
    from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
    from models.vdit import VDiT, vdit_config
    from training.export import save_model

    text = FrozenTextEncoder(TextEncoderConfig())
    config = vdit_config("VDiT-T/2", context_dim=text.width)
    save_model(folder, VDiT(config).state_dict(), config, text, ScheduleConfig(),
               {"codec": "pixels", "curriculum": [{"name": "clip", "steps": 1, "num_frames": 5, "fps": 8.0,
                                                   "size": 16}], "sampling": {"num_steps": 1, "cfg_scale": 1.0}})
    return str(folder)


@pytest.mark.slow
@pytest.mark.ray
def test_evaluation_refuses_models_of_different_codecs_unless_asked(latent_run, tmp_path):
    from pipelines.evaluate import run_evaluate
    from training.evaluate import EvaluateConfig, ModelSpec, evaluation_models

    pixels = _pixel_model(tmp_path / "pixels")
    specs = [ModelSpec(path=latent_run["train"]["model"]), ModelSpec(path=pixels)]
    config = EvaluateConfig(models=specs, prompts=["a red circle", "a blue square"], device="cpu",
                            output=str(tmp_path / "out"))
    with pytest.raises(ConfigError, match=r"^models: teacher-1 was made with codec 'pixels', teacher-2 with "
                                          r"'reelforge-vae:.*set allow_mixed_codecs: true") as err:
        run_evaluate(config)
    assert "\n" not in str(err.value) and not (tmp_path / "out" / "mlflow.db").exists()  # refused before any run
    config.allow_mixed_codecs = True
    assert [m.name for m in evaluation_models(config)] == ["teacher-2", "teacher-1"]


@pytest.mark.slow
@pytest.mark.ray
def test_generate_decodes_a_latent_students_video(latent_run, tmp_path):
    from pipelines.generate import GenerateConfig, run_generate

    student = latent_run["distill"]["rounds"][0]["model"]
    summary = run_generate(GenerateConfig(model=student, out=str(tmp_path / "v.mp4"), prompt="a red circle",
                                          device="cpu"))
    assert (summary["steps"], summary["num_frames"], summary["width"], summary["height"]) == (1, 5, 16, 16)
    with av.open(str(tmp_path / "v.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].shape == (16, 16, 3)  # decoded through the VAE: 2 latent frames -> 5
