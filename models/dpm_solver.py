"""The DPM-Solver++ (2M) sampler (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): a second-order multistep solver of the diffusion ODE in the data (x0) prediction, which
samples a model trained for DDIM well in 10-20 steps. It equals diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero" and trailing spacing.
"""

from __future__ import annotations

import torch

from models.ddim import DDIMSampler
from models.schedules import NoiseSchedule, broadcast_like


class DPMSolverPP2MSampler:
    """DPM-Solver++ (2M) steps on a NoiseSchedule. Stateless: the caller hands each step the x0 prediction and the
    timestep of the step before (None at the first step), so a loop can be written out where it is used, as DDIM's."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps: torch.LongTensor | None = None

    def set_timesteps(self, num_steps: int) -> torch.LongTensor:
        """The same trailing timesteps as DDIMSampler.set_timesteps (T-1, ..., T/n-1), so both start from noise."""
        self.timesteps = DDIMSampler(self.schedule).set_timesteps(num_steps)
        return self.timesteps

    def _alpha_sigma_lambda(self, t, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t), log(sqrt(a_t) / sqrt(1 - a_t))) in float64; t = -1 gives (1, 0, inf)."""
        a = self.schedule.alpha_cumprod(t, device)
        alpha, sigma = a.sqrt(), (1 - a).clamp(min=0).sqrt()
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    def step(
        self,
        model_output: torch.Tensor,
        t,
        t_prev,
        x_t: torch.Tensor,
        previous: tuple[torch.Tensor, int | torch.Tensor] | None = None,
        clip_x0: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One update x_t -> x_{t_prev}; returns (x_prev, x0_pred). Pass x0_pred and t as `previous` to the next step.

        `previous` = (x0 predicted at the step before, that step's timestep, which is > t): with it the step is
        second order (the 2M update), without it first order (DPM-Solver++ 1, which equals a DDIM step). The final
        step to t_prev = -1 (clean data) is always first order, where it returns x0 itself, as diffusers does with
        final_sigmas_type="zero". `clip_x0` clamps the x0 prediction like DDIMSampler.step; the clamped x0 is also
        what the next step's second-order term uses.
        """
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = torch.as_tensor(t_prev, device=x_t.device)
        num_train = self.schedule.num_train_timesteps
        if not bool(((t_prev >= -1) & (t_prev < t) & (t < num_train)).all()):
            raise ValueError(
                f"DPM-Solver++ steps go from t to an earlier t_prev with -1 <= t_prev < t < {num_train}, "
                f"got t={t.tolist()}, t_prev={t_prev.tolist()}"
            )
        x0, _ = self.schedule.to_x0_eps(model_output, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        _, sigma_t, lambda_t = self._alpha_sigma_lambda(t, x_t.device)
        alpha_prev, sigma_prev, lambda_prev = self._alpha_sigma_lambda(t_prev, x_t.device)
        h = lambda_prev - lambda_t
        # exp(-h) - 1 with h = inf at t_prev = -1 is -1: the step lands on x0 (sigma_prev / sigma_t = 0)
        coef_x = sigma_prev / sigma_t
        coef_d = -alpha_prev * torch.expm1(-h)  # multiplies D = x0 (first order) or x0 + D1 / 2 (second order)
        d = x0
        if previous is not None and bool((t_prev >= 0).all()):
            x0_before, t_before = previous
            t_before = torch.as_tensor(t_before, device=x_t.device)
            if not bool((t_before > t).all()):
                raise ValueError(f"the previous step's timestep must come before t={t.tolist()} in sampling order "
                                 f"(be larger), got {t_before.tolist()}")
            _, _, lambda_before = self._alpha_sigma_lambda(t_before, x_t.device)
            r = (lambda_t - lambda_before) / h  # the previous step's log-SNR stride relative to this one's
            d = x0 + broadcast_like(0.5 / r, x0) * (x0 - x0_before)
        x_prev = broadcast_like(coef_x, x_t) * x_t + broadcast_like(coef_d, x_t) * d
        return x_prev, x0
