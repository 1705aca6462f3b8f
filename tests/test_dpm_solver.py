"""DPM-Solver++ (2M) against diffusers' DPMSolverMultistepScheduler on the same schedule, timesteps and inputs."""

import math

import numpy as np
import pytest
import torch

from models.ddim import DDIMSampler
from models.dpm_solver import DPMSolverPP2MSampler
from models.schedules import NoiseSchedule, ScheduleConfig

diffusers = pytest.importorskip("diffusers")


def model_fn(x: torch.Tensor, t: int, schedule: NoiseSchedule) -> torch.Tensor:
    """A fixed nonlinear stand-in for a network: its x0 guess depends on x_t and t (so the multistep history
    matters), given as the eps or v output that implies it, so the outputs stay in a trained model's range."""
    x0 = torch.tanh(0.7 * x) + 0.3 * math.sin(t / 97.0) * torch.tanh(x.roll(1, dims=-1))
    a = float(schedule.alphas_cumprod[t])
    eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
    return eps if schedule.prediction == "eps" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0


def diffusers_scheduler(schedule: NoiseSchedule, prediction: str):
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=schedule.num_train_timesteps, trained_betas=schedule.betas.numpy(),
        prediction_type="epsilon" if prediction == "eps" else "v_prediction", algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", timestep_spacing="trailing", final_sigmas_type="zero")
    # the very same alphas_cumprod (diffusers recomputes them from the betas in float32)
    scheduler.alphas_cumprod = schedule.alphas_cumprod.float()
    return scheduler


def ours(schedule: NoiseSchedule, x: torch.Tensor, num_steps: int, clip_x0=None) -> torch.Tensor:
    sampler = DPMSolverPP2MSampler(schedule)
    timesteps = sampler.set_timesteps(num_steps).tolist()
    previous = None
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, x0 = sampler.step(model_fn(x, t, schedule), t, t_prev, x, previous=previous, clip_x0=clip_x0)
        previous = (x0, t)
    return x


def theirs(schedule: NoiseSchedule, x: torch.Tensor, num_steps: int) -> tuple[torch.Tensor, list[int]]:
    scheduler = diffusers_scheduler(schedule, schedule.prediction)
    scheduler.set_timesteps(num_steps)
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(model_fn(x, t, schedule), t, x).prev_sample
    return x, scheduler.timesteps.tolist()


@pytest.mark.parametrize(("kind", "prediction", "shift", "num_steps"), [
    ("cosine", "v", -2.77, 16), ("cosine", "v", 0.0, 8), ("linear", "eps", 0.0, 16), ("linear", "v", 0.0, 20),
    ("cosine", "eps", 0.0, 10),
])
def test_equals_diffusers(kind, prediction, shift, num_steps):
    schedule = NoiseSchedule(ScheduleConfig(kind=kind, prediction=prediction, logsnr_shift=shift))
    x = torch.randn((2, 3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    expected, their_timesteps = theirs(schedule, x.clone(), num_steps)
    assert DPMSolverPP2MSampler(schedule).set_timesteps(num_steps).tolist() == their_timesteps
    got = ours(schedule, x.clone(), num_steps)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5, rtol=0)
    # the 2M update is not DDIM: the comparison would catch a solver that silently fell back to first order
    ddim = DDIMSampler(schedule)
    y, timesteps = x.clone(), ddim.set_timesteps(num_steps).tolist()
    for i, t in enumerate(timesteps):
        y, _ = ddim.step(model_fn(y, t, schedule), t, timesteps[i + 1] if i + 1 < len(timesteps) else -1, y)
    assert (y - got).abs().max() > 1e-3


def test_first_order_step_equals_ddim():
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="v"))
    x = torch.randn((1, 3, 2, 4, 4), generator=torch.Generator().manual_seed(1))
    out = model_fn(x, 700, schedule)
    dpm, _ = DPMSolverPP2MSampler(schedule).step(out, 700, 500, x)
    ddim, _ = DDIMSampler(schedule).step(out, 700, 500, x)
    torch.testing.assert_close(dpm, ddim, atol=1e-5, rtol=1e-5)


def test_clip_keeps_x0_in_range_and_final_step_returns_it():
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", prediction="eps"))
    x = torch.randn((1, 3, 2, 4, 4), generator=torch.Generator().manual_seed(2))
    out = ours(schedule, x, 4, clip_x0=0.5)
    assert out.abs().max() <= 0.5 + 1e-6
    assert ours(schedule, x, 4).abs().max() > 0.5  # unclipped, the stand-in model's x0 leaves [-0.5, 0.5]


def test_bad_steps_are_refused():
    sampler = DPMSolverPP2MSampler(NoiseSchedule(ScheduleConfig()))
    x = torch.zeros((1, 3, 1, 2, 2))
    with pytest.raises(ValueError, match="earlier t_prev"):
        sampler.step(x, 10, 20, x)
    with pytest.raises(ValueError, match="previous step's timestep"):
        sampler.step(x, 500, 400, x, previous=(x, 300))
    with pytest.raises(ValueError, match="num_steps"):
        sampler.set_timesteps(0)


# ---------------------------------------------------------------------------------------------------------------------
# The sampler where users meet it: generation and the evaluation's model list


@pytest.fixture(scope="module")
def exported_teacher(tmp_path_factory) -> str:
    from models.text_encoder import FrozenTextEncoder, TextEncoderConfig
    from models.vdit import VDiT, vdit_config
    from training.export import save_model

    torch.manual_seed(0)
    config = vdit_config("VDiT-T/2")
    model = VDiT(config)
    with torch.no_grad():  # adaLN-Zero starts at a zero output: give the random model one that depends on x and t
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    folder = tmp_path_factory.mktemp("teacher") / "model"
    save_model(folder, model.state_dict(), config, FrozenTextEncoder(TextEncoderConfig()), ScheduleConfig(),
               {"preset": "VDiT-T/2", "curriculum": [{"name": "high", "steps": 1, "num_frames": 2, "fps": 2.0,
                                                      "size": 8}],
                "sampling": {"num_steps": 8, "cfg_scale": 3.0}})
    return str(folder)


def test_generate_with_dpm_solver_is_deterministic_and_not_ddim(exported_teacher):
    from training.export import load_model
    from training.sample import generate

    loaded = load_model(exported_teacher)
    args = (loaded.model, loaded.text_encoder, loaded.schedule, ["a red square moving left"], 2, 8, 6, 3.0, 5)
    dpm = generate(*args, sampler="dpmpp-2m")
    assert torch.isfinite(dpm).all() and dpm.abs().max() <= 1.0  # clip_x0=1 keeps pixels in range
    assert torch.equal(dpm, generate(*args, sampler="dpmpp-2m"))
    assert not torch.allclose(dpm, generate(*args), atol=1e-4)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        generate(*args, sampler="euler")


def test_run_generate_refuses_an_unknown_sampler(tmp_path, exported_teacher):
    from pipelines.generate import GenerateConfig, run_generate

    with pytest.raises(ValueError, match="--sampler 'heun'"):
        run_generate(GenerateConfig(model=exported_teacher, out=str(tmp_path), prompt="x", sampler="heun"))


@pytest.mark.slow
def test_evaluation_adds_the_teacher_under_dpm_solver(exported_teacher, tmp_path):
    from pipelines.config import load_config
    from training.config import ConfigError
    from training.evaluate import EvaluateConfig, evaluate, resolve_models

    overrides = [f"models=[{{path: {exported_teacher}}}]",
                 "teacher_samplings=[{sampler: dpmpp-2m, num_steps: 4}, {sampler: dpmpp-2m, num_steps: 2}]",
                 "prompts=[a red square moving left on a black background, a blue circle moving up on a grey "
                 "background]", "max_videos=2"]
    config = load_config(EvaluateConfig, None, overrides, base={"output": str(tmp_path)})
    models = resolve_models(config.model_specs())
    assert [(m.name, m.sampler, m.num_steps, m.model_evaluations_per_video) for m in models] == [
        ("teacher-8", "ddim", 8, 16), ("teacher-dpmpp-4", "dpmpp-2m", 4, 8), ("teacher-dpmpp-2", "dpmpp-2m", 2, 4)]
    result = evaluate(config)
    assert [m.name for m in result.models] == ["teacher-8", "teacher-dpmpp-4", "teacher-dpmpp-2"]
    assert [m.metrics["model_evaluations_per_video"] for m in result.models] == [16, 8, 4]
    assert not np.array_equal(result.models[0].videos, result.models[1].videos)
    with pytest.raises(ConfigError, match=r"teacher_samplings\[0\]\.sampler"):
        load_config(EvaluateConfig, None, [overrides[0], "teacher_samplings=[{sampler: euler}]"]).validate()
    with pytest.raises(ConfigError, match=r"teacher_samplings\[0\]\.path"):
        load_config(EvaluateConfig, None, [overrides[0], "teacher_samplings=[{path: x}]"]).validate()
