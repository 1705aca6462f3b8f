"""Discrete-time noise schedules (DDPM linear, improved-DDPM cosine) and the training targets they define (eps, v)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULE_KINDS = ("linear", "cosine")
PREDICTIONS = ("eps", "v")


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # "linear" (Ho et al. 2020) | "cosine" (Nichol & Dhariwal 2021, s=0.008, betas <= 0.999)
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4  # linear only
    beta_end: float = 0.02  # linear only
    prediction: str = "v"  # what the network predicts: "eps" (the noise) | "v" (Salimans & Ho 2022)
    # Added to log(SNR) at every timestep (Hoogeboom et al. 2023, "simple diffusion"; SD3's shift): a negative shift
    # makes every t noisier, so more of training and sampling falls where a small video's layout is decided. 0: as is.
    logsnr_shift: float = 0.0


def cosine_alpha_bar(t: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's f(t) = cos^2(((t + s) / (1 + s)) * pi / 2) for t in [0, 1] (not divided by f(0))."""
    return torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def broadcast_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample values, shape (B,) or (), shaped to broadcast over like (B, ...) and cast to like's dtype."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim)).to(like.dtype)


class NoiseSchedule:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t], t = 0 .. num_train_timesteps - 1.

    The tables are float64; every method indexes them at t and casts to the dtype of its tensor inputs.
    """

    def __init__(self, config: ScheduleConfig):
        if config.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {config.kind!r}: expected one of {SCHEDULE_KINDS}")
        if config.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {config.prediction!r}: expected one of {PREDICTIONS}")
        if config.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {config.num_train_timesteps}")
        self.config = config
        num_steps = config.num_train_timesteps
        if config.kind == "linear":
            self.betas = torch.linspace(config.beta_start, config.beta_end, num_steps, dtype=torch.float64)
        else:
            # betas from the ratio of consecutive alpha_bar values; clipped because alpha_bar(1) = 0 makes the last
            # beta 1, which would zero every alphas_cumprod after it (improved-diffusion's betas_for_alpha_bar)
            alpha_bar = cosine_alpha_bar(torch.arange(num_steps + 1, dtype=torch.float64) / num_steps)
            self.betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)
        if config.logsnr_shift:
            if not math.isfinite(config.logsnr_shift):
                raise ValueError(f"logsnr_shift must be a finite number, got {config.logsnr_shift}")
            a = self.alphas_cumprod
            self.alphas_cumprod = torch.sigmoid(torch.log(a) - torch.log1p(-a) + config.logsnr_shift)
            self.betas = 1 - self.alphas_cumprod / torch.cat([torch.ones(1, dtype=a.dtype), self.alphas_cumprod[:-1]])
        self._tables: dict[torch.device, torch.Tensor] = {}  # alphas_cumprod copied once per device

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    @property
    def prediction(self) -> str:
        return self.config.prediction

    def alpha_cumprod(self, t, device: torch.device | str | None = None) -> torch.Tensor:
        """alphas_cumprod[t] in float64; t = -1 gives 1.0 (clean data), where the last sampling step lands."""
        t = torch.as_tensor(t, device=device)
        if t.is_floating_point():
            raise ValueError(f"timesteps index the schedule and must be integers, got dtype {t.dtype}")
        if t.device not in self._tables:
            self._tables[t.device] = self.alphas_cumprod.to(t.device)
        table = self._tables[t.device]
        return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=table.dtype, device=t.device))

    def _coefficients(self, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) computed in float64, then shaped and cast like `like`."""
        a = self.alpha_cumprod(t, like.device)
        return broadcast_like(a.sqrt(), like), broadcast_like((1 - a).sqrt(), like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        sqrt_a, sqrt_one_minus_a = self._coefficients(t, x0)
        return sqrt_a * x0 + sqrt_one_minus_a * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """What the network is trained to output at x_t = add_noise(x0, noise, t)."""
        if self.prediction == "eps":
            return noise
        sqrt_a, sqrt_one_minus_a = self._coefficients(t, x0)
        return sqrt_a * noise - sqrt_one_minus_a * x0

    def to_x0_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Invert the parameterisation: the (x0, eps) pair implied by a model output at x_t."""
        sqrt_a, sqrt_one_minus_a = self._coefficients(t, x_t)
        if self.prediction == "eps":
            eps = model_output
            x0 = (x_t - sqrt_one_minus_a * eps) / sqrt_a
        else:
            # v = sqrt(a) eps - sqrt(1-a) x0 and x_t = sqrt(a) x0 + sqrt(1-a) eps is a rotation: invert by transposing
            x0 = sqrt_a * x_t - sqrt_one_minus_a * model_output
            eps = sqrt_one_minus_a * x_t + sqrt_a * model_output
        return x0, eps

    def snr(self, t, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t), e.g. for min-SNR loss weighting."""
        a = self.alpha_cumprod(t)
        return (a / (1 - a)).to(dtype)
