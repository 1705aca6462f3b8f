"""The sampling loop with classifier-free guidance, for DDIM or DPM-Solver++ (2M): from a start noise and encoded
prompts to the model's data (pixels or latents). Pure torch on any denoiser callable (a VDiT, an ONNX Runtime session
wrapper), so generation, evaluation, export checks and the benchmarks run the same loop."""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.ddim import DDIMSampler
from models.dpm_solver import DPMSolverPP2MSampler
from models.schedules import NoiseSchedule

SAMPLERS = ("ddim", "dpmpp-2m")


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    return name


@torch.no_grad()
def sample_guided(
    model: Callable[..., torch.Tensor],
    schedule: NoiseSchedule,
    x: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    num_steps: int,
    cfg_scale: float,
    sampler: str = "ddim",
    clip_x0: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Denoise x (B, C, T, H, W), pure noise at the first timestep, in `num_steps` steps of `sampler`.

    model(x, t, context, mask) returns eps or v as the schedule says. With cfg_scale != 1 the conditional and the
    unconditional (null_context: the empty or negative prompt) halves run as one batch of 2B, and the output is
    uncond + cfg_scale * (cond - uncond). The sampler state stays float32 whatever `dtype` the model runs in.
    """
    check_sampler(sampler)
    batch, device = x.shape[0], x.device
    solver = DPMSolverPP2MSampler(schedule) if sampler == "dpmpp-2m" else DDIMSampler(schedule)
    timesteps = solver.set_timesteps(num_steps).tolist()
    guided = cfg_scale != 1.0
    if guided:
        both_context, both_mask = torch.cat([context, null_context]), torch.cat([mask, null_mask])
    previous = None  # DPM-Solver++: (x0, t) of the step before
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((batch,), t, device=device, dtype=torch.long)
        if guided:  # one forward for the conditional and unconditional halves
            out = model(torch.cat([x, x]).to(dtype), torch.cat([t_batch, t_batch]), both_context, both_mask).float()
            cond, uncond = out.chunk(2)
            out = uncond + cfg_scale * (cond - uncond)
        else:
            out = model(x.to(dtype), t_batch, context, mask).float()
        if sampler == "dpmpp-2m":
            x, x0 = solver.step(out, t, t_prev, x, previous=previous, clip_x0=clip_x0)
            previous = (x0, t)
        else:
            x, _ = solver.step(out, t, t_prev, x, clip_x0=clip_x0)
    return x
