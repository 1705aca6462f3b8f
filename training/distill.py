"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models").

A student initialised from its teacher learns to take, in one deterministic DDIM step, the two DDIM steps the
teacher takes; each round halves the number of sampling steps (32 -> 16 -> 8 -> 4). Rounds run on the training
machinery (`training.loop`, Ray Train + DeepSpeed, checkpoints, resume, MLflow); this module holds the config and the
pure pieces: the step grids of a round and the student's regression target.

Guidance: the first round's teacher is sampled with classifier-free guidance (`teacher_cfg_scale`), so its student
learns the guided two-step result from the conditional input alone (guidance distilled in, as in Meng et al. 2023,
at one fixed scale); every student is sampled with cfg_scale 1, one network evaluation per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.ddim import DDIMSampler
from models.schedules import NoiseSchedule, broadcast_like
from training.config import (
    CheckpointConfig,
    CurriculumStage,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    SamplingConfig,
    ScalingConfig,
    TrackingConfig,
    TrainConfig,
)


@dataclass
class DistillConfig:
    teacher: str = ""  # an exported model (the `model/` folder of a training run)
    # The x0 the rounds noise (Salimans & Ho use training data): a curated dataset, whose frames go through the
    # teacher's codec in every step, or the teacher's latent cache (`reelforge encode` with its codec, text encoder
    # and last curriculum stage), read with no decode, no codec and no text tower in the step.
    data: str = ""
    output: str = ""  # one folder per round: round-1-16steps/ ... each with checkpoints and model/
    seed: int = 0
    teacher_steps: int = 32  # DDIM steps of the teacher that the first round halves
    final_steps: int = 4  # rounds halve the steps until this many
    teacher_cfg_scale: float | None = None  # None: the teacher's own sampling.cfg_scale from its config.json
    steps_per_round: int = 300  # optimizer steps per round
    stage: CurriculumStage | None = None  # frames/fps/size; None: the teacher's last curriculum stage
    ema_decay: float = 0.99
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=20, decay="linear"))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=100))
    data_loading: DataConfig = field(default_factory=DataConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(every_steps=0))  # prompts of the GIFs
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(
        experiment="reelforge-distill", registered_model="reelforge-vdit-student"))
    ray: RayConfig = field(default_factory=RayConfig)

    def round_steps(self) -> list[int]:
        """Student step counts, one per round: [16, 8, 4] for 32 -> 4."""
        from training.config import ConfigError

        steps, out = self.teacher_steps, []
        if self.final_steps < 1 or self.teacher_steps <= self.final_steps:
            raise ConfigError(f"final_steps: expected 1 <= final_steps < teacher_steps={self.teacher_steps}, got "
                              f"{self.final_steps}")
        while steps > self.final_steps:
            if steps % 2:
                raise ConfigError(f"teacher_steps: {self.teacher_steps} does not halve down to {self.final_steps} "
                                  f"(odd count {steps} on the way)")
            steps //= 2
            out.append(steps)
        if steps != self.final_steps:
            raise ConfigError(f"final_steps: {self.final_steps} is not teacher_steps={self.teacher_steps} halved "
                              "a whole number of times")
        return out


def round_train_config(config: DistillConfig, teacher: dict, student_steps: int, output: str,
                       cached: bool = False) -> TrainConfig:
    """The TrainConfig of one round: the teacher's architecture, text tower, codec, schedule and native clip size;
    this config's optimisation, scaling and tracking. `teacher` is the teacher's config.json. `cached`: the data is a
    latent cache, which holds the stage's windows under the teacher's stage name (so the round's stage keeps it)."""
    stage = config.stage or CurriculumStage(**teacher["curriculum"][-1])
    stage = CurriculumStage(name=stage.name if cached else f"distill-{student_steps}", steps=config.steps_per_round,
                            num_frames=stage.num_frames, fps=stage.fps, size=stage.size)
    from models.schedules import ScheduleConfig
    from models.text_encoder import TextEncoderConfig

    sampling = SamplingConfig(**{**vars(config.sampling), "num_steps": student_steps, "cfg_scale": 1.0})
    return TrainConfig(
        data=config.data, output=output, seed=config.seed,
        model=ModelConfig(preset=teacher.get("preset", "VDiT-T/2"), overrides=dict(teacher["model"])),
        text=TextEncoderConfig(**teacher["text"]), schedule=ScheduleConfig(**teacher["schedule"]),
        codec=round_codec(teacher, config.scaling.use_gpu),
        cfg_dropout=0.0,  # the student is only ever called with the prompt (guidance is distilled into it)
        ema_decay=config.ema_decay, curriculum=[stage], data_loading=config.data_loading, optim=config.optim,
        deepspeed=config.deepspeed, scaling=config.scaling, checkpoint=config.checkpoint, sampling=sampling,
        tracking=config.tracking, ray=config.ray,
    )


def round_codec(teacher: dict, use_gpu: bool):
    """The teacher's codec (its config.json's codec_config): the student denoises the same space, and curated frames
    are encoded through it in the step; on the round's GPU when it has one."""
    from models.codec import CodecConfig

    section = dict(teacher.get("codec_config") or {"kind": "pixels"})
    return CodecConfig(**{**section, "device": "auto" if use_gpu else "cpu"})


def step_grids(schedule: NoiseSchedule, student_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) timestep grids of a round, each ending in -1 (clean data): the teacher's grid has twice
    the steps and contains every student timestep, so student step k (t_k -> t_k+1) is teacher steps 2k and 2k+1."""
    sampler = DDIMSampler(schedule)
    student = sampler.set_timesteps(student_steps).clone()
    teacher = sampler.set_timesteps(2 * student_steps).clone()
    if not torch.equal(teacher[0::2], student):
        raise ValueError(f"the {2 * student_steps}-step grid does not contain the {student_steps}-step grid")
    end = torch.tensor([-1])
    return torch.cat([student, end]), torch.cat([teacher, end])


def draw_round_timesteps(student_grid: torch.Tensor, teacher_grid: torch.Tensor, batch: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, t_mid, t_prev) per sample: a uniformly drawn student step and the teacher timestep halfway through it."""
    k = torch.randint(0, len(student_grid) - 1, (batch,), generator=generator)
    return student_grid[k], teacher_grid[2 * k + 1], student_grid[k + 1]


TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def two_step_target(teacher_fn: TeacherFn, schedule: NoiseSchedule,
                    x_t: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor, t_prev: torch.Tensor,
                    clip_x0: float | None = 1.0) -> torch.Tensor:
    """The output the student must give at (x_t, t) so that its single DDIM step t -> t_prev lands where the
    teacher's two steps t -> t_mid -> t_prev land (Salimans & Ho, Algorithm 2), in the schedule's parameterisation
    (v or eps). `teacher_fn(x, t)` returns the teacher's (guided) model output.

    One deterministic DDIM step maps x_t to sqrt(a') x0 + sqrt(1-a') (x_t - sqrt(a) x0) / sqrt(1-a); solving it for
    the x0 that reaches the teacher's x_t'' gives x0 = (x_t'' - r x_t) / (sqrt(a') - r sqrt(a)), r = sqrt(1-a')/
    sqrt(1-a). At t_prev = -1 (a' = 1) that is the teacher's final sample itself."""
    sampler = DDIMSampler(schedule)
    x_mid, _ = sampler.step(teacher_fn(x_t, t).float(), t, t_mid, x_t, clip_x0=clip_x0)
    x_prev, _ = sampler.step(teacher_fn(x_mid, t_mid).float(), t_mid, t_prev, x_mid, clip_x0=clip_x0)
    a_t = schedule.alpha_cumprod(t, x_t.device)
    a_prev = schedule.alpha_cumprod(t_prev, x_t.device)
    ratio = ((1 - a_prev) / (1 - a_t)).sqrt()
    x0 = (x_prev.double() - broadcast_like(ratio, x_t) * x_t.double()) / broadcast_like(
        a_prev.sqrt() - ratio * a_t.sqrt(), x_t)
    eps = (x_t.double() - broadcast_like(a_t.sqrt(), x_t) * x0) / broadcast_like((1 - a_t).sqrt(), x_t)
    return schedule.target(x0, eps, t).to(x_t.dtype)


def guided(model, context: torch.Tensor, mask: torch.Tensor, null_context: torch.Tensor | None,
           null_mask: torch.Tensor | None, cfg_scale: float, dtype: torch.dtype = torch.float32) -> TeacherFn:
    """teacher_fn for `two_step_target`: the model's output with classifier-free guidance at `cfg_scale` (one
    batched forward for both halves), or the conditional output alone at cfg_scale 1."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return model(x.to(dtype), t, context, mask).float()
        out = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([context, null_context]),
                    torch.cat([mask, null_mask])).float()
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return fn
