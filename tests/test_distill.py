"""Progressive distillation: the round plan, the step grids and the student's target against closed forms."""

from __future__ import annotations

import pytest
import torch

from models.ddim import DDIMSampler
from models.schedules import NoiseSchedule, ScheduleConfig
from pipelines.config import ConfigError
from training.distill import DistillConfig, draw_round_timesteps, guided, step_grids, two_step_target


def test_rounds_halve_the_steps_down_to_the_final_count():
    assert DistillConfig(teacher_steps=32, final_steps=4).round_steps() == [16, 8, 4]
    assert DistillConfig(teacher_steps=8, final_steps=1).round_steps() == [4, 2, 1]
    with pytest.raises(ConfigError, match="odd count 3"):
        DistillConfig(teacher_steps=24, final_steps=2).round_steps()
    with pytest.raises(ConfigError, match="final_steps"):
        DistillConfig(teacher_steps=4, final_steps=4).round_steps()


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_teacher_grid_holds_every_student_timestep_and_its_midpoints(kind):
    schedule = NoiseSchedule(ScheduleConfig(kind=kind))
    student, teacher = step_grids(schedule, 4)
    assert student.tolist() == [999, 749, 499, 249, -1]
    assert teacher.tolist() == [999, 874, 749, 624, 499, 374, 249, 124, -1]
    t, t_mid, t_prev = draw_round_timesteps(student, teacher, 64, torch.Generator().manual_seed(0))
    assert bool(((t > t_mid) & (t_mid > t_prev)).all())
    assert set(t.tolist()) == {999, 749, 499, 249}  # every student step is drawn
    assert set((t - t_prev).tolist()) == {250}


def _linear_teacher(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, t-dependent, non-trivial 'teacher' so its two steps differ from any single step."""
    scale = (t.float() / 1000.0).view(-1, *([1] * (x.dim() - 1)))
    return 0.7 * x.flip(-1) * (1 + scale) - 0.2 * scale


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_one_student_step_on_the_target_lands_where_two_teacher_steps_land(prediction):
    """The defining property: a student that outputs the target, stepped once with DDIM, reproduces the teacher's
    two deterministic DDIM steps (here with no x0 clipping, so the identity is exact up to rounding)."""
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction=prediction))
    sampler = DDIMSampler(schedule)
    student, teacher = step_grids(schedule, 4)
    g = torch.Generator().manual_seed(1)
    t, t_mid, t_prev = draw_round_timesteps(student, teacher, 8, g)
    x_t = torch.randn(8, 3, 2, 4, 4, generator=g, dtype=torch.float64)
    target = two_step_target(_linear_teacher, schedule, x_t, t, t_mid, t_prev, clip_x0=None)
    x_mid, _ = sampler.step(_linear_teacher(x_t, t), t, t_mid, x_t)
    expected, _ = sampler.step(_linear_teacher(x_mid, t_mid), t_mid, t_prev, x_mid)
    landed, _ = sampler.step(target, t, t_prev, x_t)
    torch.testing.assert_close(landed, expected, rtol=1e-5, atol=1e-6)  # the schedule keeps float32 alphas
    # and one teacher step from the same point does not land there (the target is not the teacher's output)
    single, _ = sampler.step(_linear_teacher(x_t, t), t, t_prev, x_t)
    assert (single - expected).abs().max() > 1e-2


def test_the_exact_teacher_of_one_data_point_gives_that_point_as_the_students_x0():
    """For data that is a single point x*, the ideal eps-teacher is (x_t - sqrt(a) x*) / sqrt(1 - a): DDIM then
    moves along the straight line to x*, and the student's target must be exactly the ideal output at t."""
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="eps"))
    x_star = torch.linspace(-0.9, 0.9, 48, dtype=torch.float64).view(1, 3, 1, 4, 4)

    def ideal(x, t):
        a = schedule.alpha_cumprod(t).view(-1, 1, 1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    student, teacher = step_grids(schedule, 2)
    g = torch.Generator().manual_seed(2)
    t, t_mid, t_prev = draw_round_timesteps(student, teacher, 6, g)
    x_t = schedule.add_noise(x_star.expand(6, -1, -1, -1, -1), torch.randn(6, 3, 1, 4, 4, generator=g,
                                                                           dtype=torch.float64), t)
    target = two_step_target(ideal, schedule, x_t, t, t_mid, t_prev, clip_x0=None)
    torch.testing.assert_close(target, ideal(x_t, t), rtol=1e-5, atol=1e-6)


def test_guidance_combines_the_conditional_and_unconditional_outputs():
    class Probe(torch.nn.Module):  # output = mean of the context, broadcast: tells which context a sample saw
        def forward(self, x, t, context, mask):
            return x * 0 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)

    x = torch.zeros(2, 3, 1, 2, 2)
    t = torch.tensor([10, 20])
    cond, null = torch.full((2, 4, 8), 2.0), torch.full((2, 4, 8), 0.5)
    mask = torch.ones(2, 4, dtype=torch.bool)
    out = guided(Probe(), cond, mask, null, mask, cfg_scale=3.0)(x, t)
    assert torch.allclose(out, torch.full_like(out, 0.5 + 3.0 * (2.0 - 0.5)))
    assert torch.allclose(guided(Probe(), cond, mask, None, None, cfg_scale=1.0)(x, t), torch.full_like(out, 2.0))
