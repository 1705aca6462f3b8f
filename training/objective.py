"""What a training run learns, chosen once per run: plain diffusion (predict the schedule's target for noised data)
or a progressive-distillation round (match a frozen teacher's two DDIM steps with one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.schedules import NoiseSchedule
from training.distill import draw_round_timesteps, guided, step_grids, two_step_target


@dataclass
class DistillRound:
    """One round of progressive distillation: the teacher model folder and the step count its student learns."""

    teacher: str  # an exported model folder every worker can read
    student_steps: int
    cfg_scale: float  # the teacher's guidance (the first round's; later teachers have it distilled in: 1.0)
    round: int
    base_model: str  # the first teacher of the chain

    def export_info(self) -> dict:
        return {"distilled_from": self.teacher, "round": self.round, "teacher_steps": 2 * self.student_steps,
                "teacher_cfg_scale": self.cfg_scale, "base_model": self.base_model}


@dataclass
class NoisedBatch:
    x_t: torch.Tensor  # the model's input
    t: torch.Tensor  # (B,) timesteps
    target: torch.Tensor  # what the model's output is regressed on


class DiffusionObjective:
    """Noise x0 at a uniformly drawn timestep; the target is the schedule's (eps or v)."""

    def __init__(self, schedule: NoiseSchedule):
        self.schedule = schedule

    def noised(self, x0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = torch.randint(0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        return NoisedBatch(self.schedule.add_noise(x0, noise, t), t, self.schedule.target(x0, noise, t))


class DistillationObjective:
    """x0 noised at a student timestep; the target makes the student's one DDIM step land where the teacher's two
    land. The teacher runs in fp32 whatever the student's precision; `null_text` is the empty prompt's (context,
    mask) for the teacher's guidance, encoded once per run. `clip_x0`: the codec's clip_range (1 for pixels, None
    for latents), as sampling clamps the teacher's x0 predictions."""

    def __init__(self, round_: DistillRound, teacher: torch.nn.Module, schedule: NoiseSchedule,
                 null_text: tuple[torch.Tensor, torch.Tensor] | None, clip_x0: float | None = 1.0):
        self.round = round_
        self.clip_x0 = clip_x0
        self.teacher = teacher
        self.schedule = schedule
        self.null_text = null_text
        self.grids = step_grids(schedule, round_.student_steps)

    def noised(self, x0: torch.Tensor, context: torch.Tensor, mask: torch.Tensor,
               generator: torch.Generator) -> NoisedBatch:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t, t_mid, t_prev = (v.to(x0.device) for v in draw_round_timesteps(*self.grids, x0.shape[0], generator))
        x_t = self.schedule.add_noise(x0, noise, t)
        null_context, null_mask = self.null_text or (None, None)
        if null_context is not None:
            null_context, null_mask = null_context[:x0.shape[0]], null_mask[:x0.shape[0]]
        fn = guided(self.teacher, context.float(), mask, null_context, null_mask, self.round.cfg_scale)
        return NoisedBatch(x_t, t, two_step_target(fn, self.schedule, x_t, t, t_mid, t_prev, clip_x0=self.clip_x0))
