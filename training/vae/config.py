"""The train-vae config: the training config's engine, data, curriculum, checkpoint and tracking sections, plus the
autoencoder (`vae`), its loss and its held-out evaluation. The diffusion-only sections must stay unset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.causal_vae import PRESETS, CausalVAEConfig, causal_vae_config
from training.config import ConfigError, CurriculumStage, TrackingConfig, TrainConfig, _non_negative, _positive

RECONSTRUCTION_LOSSES = ("l1", "l2")
VAE_EXPERIMENT = "reelforge-train-vae"
VAE_REGISTERED_MODEL = "reelforge-vae"
# TrainConfig sections the autoencoder does not use: a value there is a mistake, not a setting
DIFFUSION_ONLY = ("model", "text", "codec", "schedule", "sampling", "cfg_dropout")


@dataclass
class VAEModelSection:
    preset: str = "CausalVAE-T-4x4x4"  # a key of models.causal_vae.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # fields of CausalVAEConfig, e.g. {latent_channels: 4}

    def model_config(self) -> CausalVAEConfig:
        if self.preset not in PRESETS:
            raise ConfigError(f"vae.preset: unknown preset {self.preset!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(CausalVAEConfig)}
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ConfigError(f"vae.overrides.{unknown[0]}: not a CausalVAEConfig field; expected among "
                              f"{sorted(known)}")
        config = causal_vae_config(self.preset, **self.overrides)
        problems = config.problems()
        if problems:
            raise ConfigError(f"vae: {problems[0]}")
        return config


@dataclass
class VAELossConfig:
    reconstruction: str = "l1"  # "l1" | "l2", per pixel value
    kl_weight: float = 1e-6  # times the KL to N(0, I) summed over the latent, per pixel value (LDM's weighting)
    gradient_weight: float = 0.0  # L1 between the finite differences of input and output in x, y and t


@dataclass
class VAEEvalConfig:
    heldout_clips: int = 8  # curated clips kept out of training and reconstructed for PSNR, SSIM and the GIFs
    every_steps: int = 500  # held-out evaluation every N steps (also at step 0 and at the end); 0: start and end
    gif_clips: int = 4  # held-out clips in each side-by-side GIF (original | reconstruction)


def _vae_curriculum() -> list[CurriculumStage]:
    return [CurriculumStage(num_frames=9, size=32)]  # 1 + 4k frames for the default preset's 4x time compression


@dataclass
class VAETrainConfig(TrainConfig):
    curriculum: list[CurriculumStage] = field(default_factory=_vae_curriculum)
    vae: VAEModelSection = field(default_factory=VAEModelSection)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    eval: VAEEvalConfig = field(default_factory=VAEEvalConfig)

    def __post_init__(self):
        # the shared tracking section's defaults name the diffusion model's experiment and registry entry: a VAE
        # run left at them logs and registers under its own (a section built from YAML or --set gets them too)
        defaults = TrackingConfig()
        if self.tracking.experiment == defaults.experiment:
            self.tracking.experiment = VAE_EXPERIMENT
        if self.tracking.registered_model == defaults.registered_model:
            self.tracking.registered_model = VAE_REGISTERED_MODEL

    def validate(self) -> None:
        if not self.curriculum:
            raise ConfigError("curriculum: at least one stage is needed")
        defaults = VAETrainConfig()
        for name in DIFFUSION_ONLY:
            if getattr(self, name) != getattr(defaults, name):
                raise ConfigError(f"{name}: not used by train-vae (the autoencoder is set under vae, loss and eval); "
                                  "remove it")
        _positive(self, ["checkpoint.every_steps", "checkpoint.num_to_keep", "tracking.log_every_steps",
                         "deepspeed.micro_batch_size", "deepspeed.grad_accum", "scaling.num_workers",
                         "scaling.threads_per_worker", "data_loading.decode_batch_size",
                         "data_loading.windows_per_clip", "optim.lr", "eval.heldout_clips"])
        _non_negative(self, ["data_loading.prefetch_batches", "optim.warmup_steps", "checkpoint.max_failures",
                             "eval.every_steps", "eval.gif_clips", "loss.kl_weight", "loss.gradient_weight"])
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps: expected a step >= 1 or null, got {self.stop_after_steps}")
        self._validate_engine()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay}")
        if self.loss.reconstruction not in RECONSTRUCTION_LOSSES:
            raise ConfigError(f"loss.reconstruction: expected one of {list(RECONSTRUCTION_LOSSES)}, got "
                              f"{self.loss.reconstruction!r}")
        model = self.vae.model_config()
        for index, stage in enumerate(self.curriculum):
            _validate_stage(f"curriculum[{index}] ({stage.name})", stage, model)


def _validate_stage(name: str, stage: CurriculumStage, model: CausalVAEConfig) -> None:
    """A stage's clips must be encodable: 1 + t*k frames and a size divisible by the space compression."""
    if stage.steps <= 0 or stage.num_frames <= 0 or stage.size <= 0 or stage.fps <= 0:
        raise ConfigError(f"{name}: steps, num_frames, size and fps must be above 0, got steps={stage.steps} "
                          f"num_frames={stage.num_frames} size={stage.size} fps={stage.fps}")
    t, s = model.time_compression, model.space_compression
    if (stage.num_frames - 1) % t:
        fix = 1 + (stage.num_frames - 1) // t * t
        raise ConfigError(f"{name}: num_frames {stage.num_frames} is not 1 + {t}k (the first frame is encoded "
                          f"alone, then {t} frames per latent frame); use num_frames {fix} or {fix + t}")
    if stage.size % s:
        fix = stage.size - stage.size % s
        raise ConfigError(f"{name}: size {stage.size} is not divisible by the space compression {s}; use size "
                          f"{fix or s} or {fix + s}")
