"""Noise schedules against their closed forms, and the DDIM sampler against oracle and analytic denoisers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.ddim import DDIMSampler, sample
from models.schedules import NoiseSchedule, ScheduleConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_schedule(kind: str = "cosine", prediction: str = "v", num_train_timesteps: int = 1000) -> NoiseSchedule:
    return NoiseSchedule(ScheduleConfig(kind=kind, prediction=prediction, num_train_timesteps=num_train_timesteps))


# ------------------------------------------------------------------------------------------------------------------
# schedules


def test_linear_betas_and_alphas_cumprod_match_numpy():
    schedule = NoiseSchedule(ScheduleConfig(kind="linear", beta_start=1e-4, beta_end=0.02))
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    assert len(schedule.betas) == 1000
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    expected = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy(), expected, rtol=1e-12)


def test_cosine_alphas_cumprod_match_the_closed_form_until_clipping():
    schedule = make_schedule("cosine")
    s, steps = 0.008, 1000
    f = lambda t: math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t + 1) / f(0) for t in range(steps)])  # alphas_cumprod[t] = alpha_bar((t + 1) / T)
    clipped = (schedule.betas >= 0.999).numpy()
    assert clipped.sum() <= 2 and clipped[-1]  # only the last step(s), where alpha_bar reaches 0
    first_clipped = int(np.argmax(clipped))
    np.testing.assert_allclose(schedule.alphas_cumprod.numpy()[:first_clipped], expected[:first_clipped], rtol=1e-9)
    assert 0 < schedule.alphas_cumprod[-1].item() < 1e-6  # the last timestep is (almost) pure noise
    assert schedule.betas.max().item() <= 0.999


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_add_noise_target_and_inversion_round_trip(kind, prediction):
    schedule = make_schedule(kind, prediction)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 2, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    x_t = schedule.add_noise(x0, noise, t)
    x0_back, eps_back = schedule.to_x0_eps(schedule.target(x0, noise, t), x_t, t)
    torch.testing.assert_close(x0_back, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_back, noise, atol=1e-5, rtol=0)

    # float32 stays float32, and is accurate where sqrt(a) is not tiny
    x0_32, noise_32, t_mid = x0.float(), noise.float(), torch.tensor([0, 1, 250, 500, 700, 900])
    x_t_32 = schedule.add_noise(x0_32, noise_32, t_mid)
    out = schedule.to_x0_eps(schedule.target(x0_32, noise_32, t_mid), x_t_32, t_mid)
    assert x_t_32.dtype == out[0].dtype == out[1].dtype == torch.float32
    torch.testing.assert_close(out[0], x0_32, atol=1e-4, rtol=0)


def test_add_noise_and_v_target_closed_forms():
    schedule = make_schedule("cosine", "v")
    x0, noise = torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    t = torch.tensor([3, 400, 990])
    a = schedule.alphas_cumprod[t].float()[:, None, None]
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(schedule.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    assert torch.equal(make_schedule("cosine", "eps").target(x0, noise, t), noise)
    # a python int timestep is shared by the batch
    torch.testing.assert_close(
        schedule.add_noise(x0, noise, 400), schedule.add_noise(x0, noise, torch.full((3,), 400))
    )


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_snr_is_positive_and_strictly_decreasing(kind):
    snr = make_schedule(kind).snr(torch.arange(1000), dtype=torch.float64)
    assert (snr > 0).all() and (snr[1:] < snr[:-1]).all()


def test_unknown_kind_or_prediction_names_the_value_and_the_options():
    with pytest.raises(ValueError, match=r"'quadratic'.*linear.*cosine"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match=r"'x0'.*eps.*v"):
        make_schedule(prediction="x0")
    with pytest.raises(ValueError, match="integers"):
        make_schedule().add_noise(torch.zeros(2), torch.zeros(2), torch.tensor([0.5, 1.0]))


# ------------------------------------------------------------------------------------------------------------------
# DDIM


def test_set_timesteps_are_descending_evenly_spaced_and_start_at_the_last_timestep():
    sampler = DDIMSampler(make_schedule())
    for num_steps in (1, 3, 10, 50, 999, 1000):
        timesteps = sampler.set_timesteps(num_steps)
        assert timesteps.dtype == torch.long and len(timesteps) == num_steps
        assert timesteps[0].item() == 999 and timesteps[-1].item() >= 0
        gaps = (timesteps[:-1] - timesteps[1:]).tolist()
        assert all(g > 0 for g in gaps) and max(gaps, default=0) - min(gaps, default=0) <= 1
    assert sampler.set_timesteps(10).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_steps"):
            sampler.set_timesteps(bad)


def oracle(schedule: NoiseSchedule, x0: torch.Tensor):
    """A model that knows x0: its output is exactly the target implied by x_t and the true x0."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_cumprod(t).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.target(x0, eps, t)

    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("num_steps", [1, 10])
def test_deterministic_ddim_with_an_oracle_recovers_x0(prediction, num_steps):
    schedule = make_schedule("cosine", prediction)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sample(
        oracle(schedule, x0),
        DDIMSampler(schedule),
        x0.shape,
        num_steps,
        torch.Generator().manual_seed(2),
        dtype=torch.float64,
    )
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=0)


def test_one_ddim_step_matches_the_closed_form_for_any_pair_of_timesteps():
    schedule = make_schedule("linear", "v")
    sampler = DDIMSampler(schedule)
    generator = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
    for t, t_prev in [(999, 899), (500, 123), (37, 36), (10, -1)]:
        x_t = schedule.add_noise(x0, eps, t)
        x_prev, x0_pred = sampler.step(schedule.target(x0, eps, t), t, t_prev, x_t)
        a_prev = schedule.alphas_cumprod[t_prev].item() if t_prev >= 0 else 1.0
        torch.testing.assert_close(x0_pred, x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(x_prev, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, atol=1e-5, rtol=0)

    # per-sample timesteps (progressive distillation draws t per sample) give the same rows as scalar calls
    t, t_prev = torch.tensor([999, 500, 37, 10]), torch.tensor([899, 123, 36, -1])
    x_t = schedule.add_noise(x0, eps, t)
    batched, _ = sampler.step(schedule.target(x0, eps, t), t, t_prev, x_t)
    for i in range(4):
        row, _ = sampler.step(schedule.target(x0, eps, t)[i : i + 1], int(t[i]), int(t_prev[i]), x_t[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], row)

    with pytest.raises(ValueError, match="t_prev"):
        sampler.step(x_t, 100, 100, x_t)
    with pytest.raises(ValueError, match="t_prev"):
        sampler.step(x_t, 1000, 10, x_t)


def gaussian_denoiser(schedule: NoiseSchedule, mu: float, sigma: float):
    """The optimal model for data ~ N(mu, sigma^2): E[x0 | x_t] in closed form, returned as the model's target."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = schedule.alpha_cumprod(t).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        x0 = mu + a.sqrt() * sigma**2 / (a * sigma**2 + 1 - a) * (x_t - a.sqrt() * mu)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return schedule.target(x0, eps, t)

    return model_fn


@pytest.mark.parametrize("prediction, eta", [("v", 0.0), ("eps", 0.0), ("v", 1.0)])
def test_ddim_samples_a_gaussian_with_its_mean_and_std(prediction, eta):
    # few steps shrink the spread (std 0.24 at 10 steps, 0.29 at 50, here): a discretisation error that vanishes
    # as the steps get finer, so "many steps" it is
    schedule = make_schedule("cosine", prediction)
    mu, sigma = 0.7, 0.3
    out = sample(
        gaussian_denoiser(schedule, mu, sigma),
        DDIMSampler(schedule),
        (20000, 1),
        500,
        torch.Generator().manual_seed(4),
        dtype=torch.float64,
        eta=eta,
    )
    assert out.mean().item() == pytest.approx(mu, abs=0.01)
    assert out.std().item() == pytest.approx(sigma, rel=0.03)


def test_clip_x0_bounds_the_prediction_and_keeps_an_in_range_oracle_exact():
    schedule = NoiseSchedule(ScheduleConfig(kind="cosine", prediction="v"))
    sampler = DDIMSampler(schedule)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((2, 3, 4, 4), generator=g) * 1.6 - 0.8  # inside [-1, 1]
    x_t = schedule.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([600, 600]))
    a = schedule.alphas_cumprod[600].float()
    oracle_v = a.sqrt() * (x_t - a.sqrt() * x0) / (1 - a).sqrt() - (1 - a).sqrt() * x0
    plain, _ = sampler.step(oracle_v, 600, 300, x_t)
    clipped, x0_clipped = sampler.step(oracle_v, 600, 300, x_t, clip_x0=1.0)
    assert torch.allclose(plain, clipped, atol=1e-5) and torch.allclose(x0_clipped, x0, atol=1e-5)
    wild = oracle_v * 5  # an overshooting model
    _, x0_wild = sampler.step(wild, 600, 300, x_t, clip_x0=1.0)
    assert float(x0_wild.abs().max()) <= 1.0
    _, x0_free = sampler.step(wild, 600, 300, x_t)
    assert float(x0_free.abs().max()) > 1.0


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_logsnr_shift_moves_log_snr_by_exactly_the_shift_and_keeps_the_tables_consistent(kind):
    plain = NoiseSchedule(ScheduleConfig(kind=kind))
    shifted = NoiseSchedule(ScheduleConfig(kind=kind, logsnr_shift=-2.77))
    t = torch.arange(1000)
    difference = torch.log(shifted.snr(t, torch.float64)) - torch.log(plain.snr(t, torch.float64))
    assert torch.allclose(difference, torch.full_like(difference, -2.77), atol=1e-9)
    assert bool((shifted.alphas_cumprod < plain.alphas_cumprod).all())  # noisier at every t
    # betas and alphas_cumprod still describe one Markov chain
    assert torch.allclose(torch.cumprod(1 - shifted.betas, 0), shifted.alphas_cumprod, rtol=1e-12)
    assert bool(((shifted.betas > 0) & (shifted.betas < 1)).all())
    with pytest.raises(ValueError, match="logsnr_shift"):
        NoiseSchedule(ScheduleConfig(kind=kind, logsnr_shift=float("nan")))
