"""The DDIM sampler (Song et al. 2021, "Denoising Diffusion Implicit Models") and a plain sampling loop."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.schedules import NoiseSchedule, broadcast_like


class DDIMSampler:
    """DDIM steps between any two timesteps of a NoiseSchedule; eta=0 is deterministic, eta=1 is DDPM-like."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule
        self.timesteps: torch.LongTensor | None = None

    def set_timesteps(self, num_steps: int) -> torch.LongTensor:
        """num_steps evenly spaced timesteps, descending, with "trailing" spacing.

        Trailing spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed") counts back
        from the last training timestep: T-1, T-1-T/n, ..., T/n-1. Sampling thus starts at the noisiest timestep the
        model was trained on, where x_t is (almost) pure noise for the linear and cosine schedules. DDIM's original
        "leading" spacing (0, T/n, ..., T-T/n, reversed) would start at T-T/n, from a sample that is not noise alone.
        """
        num_train = self.schedule.num_train_timesteps
        if not 1 <= num_steps <= num_train:
            raise ValueError(f"num_steps must be between 1 and num_train_timesteps={num_train}, got {num_steps}")
        steps = torch.arange(num_steps, dtype=torch.float64) * (num_train / num_steps)
        self.timesteps = (torch.round(num_train - steps) - 1).long()
        return self.timesteps

    def step(
        self,
        model_output: torch.Tensor,
        t,
        t_prev,
        x_t: torch.Tensor,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t_prev}; returns (x_prev, x0_pred).

        `clip_x0` clamps the predicted x0 to [-clip_x0, clip_x0] and takes the noise consistent with it (diffusers'
        clip_sample): for data of known range (pixels in [-1, 1]), it stops an imperfect model's early x0 guesses
        from overshooting.

        t and t_prev are ints or per-sample (B,) integer tensors with -1 <= t_prev < t; t_prev = -1 is the final step
        to alpha_cumprod = 1 (clean data). Any pair works, not only consecutive set_timesteps entries, so progressive
        distillation can build its two-step teacher targets from this method.
        """
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = torch.as_tensor(t_prev, device=x_t.device)
        num_train = self.schedule.num_train_timesteps
        if not bool(((t_prev >= -1) & (t_prev < t) & (t < num_train)).all()):
            raise ValueError(
                f"DDIM steps go from t to an earlier t_prev with -1 <= t_prev < t < {num_train}, "
                f"got t={t.tolist()}, t_prev={t_prev.tolist()}"
            )
        x0, eps = self.schedule.to_x0_eps(model_output, x_t, t)

        a_t = self.schedule.alpha_cumprod(t, x_t.device)  # float64
        a_prev = self.schedule.alpha_cumprod(t_prev, x_t.device)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - broadcast_like(a_t.sqrt(), x_t) * x0) / broadcast_like((1 - a_t).sqrt(), x_t)
        # eq. 16 of the paper: eta interpolates between the deterministic ODE (0) and the DDPM posterior (1)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        coef_x0 = a_prev.sqrt()
        coef_eps = (1 - a_prev - sigma**2).clamp(min=0).sqrt()  # clamp: rounding can dip below 0 at t_prev = -1
        x_prev = broadcast_like(coef_x0, x_t) * x0 + broadcast_like(coef_eps, x_t) * eps
        if eta > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_prev = x_prev + broadcast_like(sigma, x_t) * noise
        return x_prev, x0


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: DDIMSampler,
    shape: tuple[int, ...],
    num_steps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    eta: float = 0.0,
) -> torch.Tensor:
    """Sample from pure noise with num_steps DDIM steps; model_fn(x_t, t_batch) returns the model output.

    The generator, if given, must live on `device`. Classifier-free guidance belongs in model_fn.
    """
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    timesteps = sampler.set_timesteps(num_steps).tolist()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        model_output = model_fn(x, t_batch)
        x, _ = sampler.step(model_output, t, t_prev, x, eta=eta, generator=generator)
    return x
