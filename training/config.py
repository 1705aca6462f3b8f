"""The training config: one nested dataclass per concern. Defaults are neutral library values that run a tiny model
on 2 CPU workers; the demo's tuning lives in configs/train/demo.yaml and configs/quickstart.yaml."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from models.codec import CODEC_KINDS, CodecConfig
from models.schedules import ScheduleConfig
from models.text_encoder import TextEncoderConfig
from training.config_error import ConfigError  # noqa: F401 (importers of training.config take it from here)


@dataclass
class ModelConfig:
    preset: str = "VDiT-T/2"  # a key of models.vdit.PRESETS
    overrides: dict[str, Any] = field(default_factory=dict)  # fields of VDiTConfig, e.g. {depth: 4}
    compile: bool = False  # torch.compile each transformer block (one graph reused by every block: short compile)


@dataclass
class CurriculumStage:
    """One stage of the curriculum: clips are decoded to `num_frames` frames at `fps`, resized so the short side is
    `size` and centre-cropped to a square (no flips or random crops: captions name directions and positions)."""

    name: str = "base"
    steps: int = 200  # optimizer steps in this stage
    num_frames: int = 8
    fps: float = 8.0
    size: int = 32
    # What the stage reads (training/stage_data.py): "video" windows of the curated clips; "keyframes", one frame
    # per sample from the curated clips' stored keyframes; "images", one frame per image of the folder `images`
    # (captions from its captions.jsonl or a .txt beside each image). Image sources need num_frames 1.
    source: str = "video"
    images: str = ""
    # Only the curated clips this filter over the clips table selects (Lance SQL; pNN(column) is the column's NN-th
    # percentile over the version's kept clips), e.g. "aesthetic >= p90(aesthetic)"; empty: every kept clip
    where: str = ""
    # with buckets.aspect_ratios: the frame counts of this stage's buckets (training/buckets.py); empty: num_frames
    bucket_frames: list[int] = field(default_factory=list)


@dataclass
class BucketConfig:
    """Aspect-ratio buckets (training/buckets.py): each clip is resized, keeping its aspect ratio, to the nearest
    bucket's shape at each stage (about size x size pixels, sides multiples of patch x codec compression), and each
    micro-batch comes from one bucket. Empty `aspect_ratios` (the default): square centre crops of each stage."""

    aspect_ratios: list[str] = field(default_factory=list)  # width:height, e.g. ["16:9", "9:16", "4:3", "1:1"]
    # a clip whose |ln(its aspect / bucket's)| is above this for every bucket fits none (counted and reported);
    # it bounds the crop: at most 1 - exp(-0.2) = 18 % of one side
    max_aspect_error: float = 0.2


@dataclass
class DataConfig:
    cache: bool = True  # keep decoded clips in each worker's memory (up to cache_mib): later epochs skip decoding
    cache_mib: int = 1024
    decode_batch_size: int = 8  # rows per decode batch where clips are decoded in batches (evaluation, benches)
    decode_concurrency: int | None = None  # decode threads per worker; None: min(4, CPUs)
    prefetch_batches: int = 2  # micro-batches decoded ahead of the step
    windows_per_clip: int = 1  # training clips per curated clip, spread over its length (more data from few clips)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 50
    decay: str = "cosine"  # "cosine" (DeepSpeed WarmupCosineLR) | "linear" (WarmupDecayLR) | "constant" (WarmupLR)
    min_lr_ratio: float = 0.1  # cosine: the final LR as a fraction of lr
    grad_clip: float = 1.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    micro_batch_size: int = 4  # per worker; train_batch_size = micro x grad_accum x workers
    grad_accum: int = 1
    precision: str = "fp32"  # "fp32" | "bf16"
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on the CPU
    # more `zero_optimization` keys, passed to DeepSpeed as written (e.g. overlap_comm, contiguous_gradients,
    # reduce_bucket_size); stage and offload come from the fields above
    zero_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScalingConfig:
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1  # torch intra-op threads in each worker


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    num_to_keep: int = 2
    max_failures: int = 2  # worker-group restarts from the last checkpoint before the run fails


@dataclass
class SamplingConfig:
    every_steps: int = 1000  # 0: only at the end
    prompts: list[str] = field(default_factory=list)  # none: no sample videos are made
    num_steps: int = 32  # the teacher's sampling steps (distillation halves them)
    cfg_scale: float = 3.0
    seed: int = 0


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db
    experiment: str = "reelforge-train"
    registered_model: str = "reelforge-vdit"
    log_every_steps: int = 10
    parent_run_id: str | None = None  # nest this run under another (set by `reelforge run` and by distillation)


@dataclass
class RayConfig:
    address: str | None = None
    num_cpus: int | None = None


@dataclass
class TrainConfig:
    data: str = ""  # a curated dataset (the output of `reelforge curate`)
    output: str = ""  # checkpoints, the exported model, the run's config and MLflow store
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)  # what the model denoises (models/codec.py)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cfg_dropout: float = 0.1  # probability of training on the empty prompt (classifier-free guidance)
    ema_decay: float = 0.995
    # End this invocation at this global step (checkpointed and exported); rerunning without it continues.
    # For time-sliced clusters and for tests of the resume path. None: train to the end of the curriculum.
    stop_after_steps: int | None = None
    # Resume even though the curated dataset changed since the checkpoint (grown by a new dump): the sample order
    # from the resume on is the new dataset's. Off: resuming against other data stops with what differs.
    accept_data_change: bool = False
    curriculum: list[CurriculumStage] = field(default_factory=lambda: [CurriculumStage()])
    buckets: BucketConfig = field(default_factory=BucketConfig)  # none: square centre crops
    data_loading: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def total_steps(self) -> int:
        return sum(stage.steps for stage in self.curriculum)

    def stage_at(self, step: int) -> tuple[int, CurriculumStage]:
        """The curriculum stage that optimizer step `step` (0-based) belongs to."""
        end = 0
        for index, stage in enumerate(self.curriculum):
            end += stage.steps
            if step < end:
                return index, stage
        return len(self.curriculum) - 1, self.curriculum[-1]

    def validate(self) -> None:
        """Every mistake a config can hold, found before any cluster or tracking run starts."""
        if not self.curriculum:
            raise ConfigError("curriculum: at least one stage is needed")
        _positive(self, ["checkpoint.every_steps", "checkpoint.num_to_keep", "tracking.log_every_steps",
                         "deepspeed.micro_batch_size", "deepspeed.grad_accum", "scaling.num_workers",
                         "scaling.threads_per_worker", "data_loading.decode_batch_size",
                         "data_loading.windows_per_clip", "optim.lr"])
        _non_negative(self, ["sampling.every_steps", "sampling.num_steps", "data_loading.prefetch_batches",
                             "optim.warmup_steps", "checkpoint.max_failures"])
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise ConfigError(f"stop_after_steps: expected a step >= 1 or null, got {self.stop_after_steps}")
        self._validate_engine()
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {self.cfg_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay: expected a number in [0, 1), got {self.ema_decay}")
        self._validate_text_weights()
        if self.codec.kind not in CODEC_KINDS:
            raise ConfigError(f"codec.kind: expected one of {list(CODEC_KINDS)}, got {self.codec.kind!r}")
        patch = self.model_config()
        for index, stage in enumerate(self.curriculum):
            _validate_stage(f"curriculum[{index}] ({stage.name})", stage, patch.patch_size, patch.patch_frames)
        validate_buckets(self.buckets, self.curriculum, patch.patch_frames)

    def _validate_text_weights(self) -> None:
        from models.clip_scorer import weights_problem

        problem = weights_problem(self.text.model_name, self.text.pretrained, self.text.pretrained_sha256)
        if problem:
            raise ConfigError(f"text.pretrained: {problem}")

    def _validate_engine(self) -> None:
        ds = self.deepspeed
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: expected 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.precision not in ("fp32", "bf16"):
            raise ConfigError(f"deepspeed.precision: expected fp32 or bf16, got {ds.precision!r}")
        if ds.offload_params and ds.zero_stage != 3:
            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer needs deepspeed.zero_stage 1, 2 or 3")
        owned = sorted({"stage", "offload_optimizer", "offload_param"} & set(ds.zero_options))
        if owned:
            raise ConfigError(f"deepspeed.zero_options: {', '.join(owned)} come from deepspeed.zero_stage and "
                              "deepspeed.offload_*; set those instead")
        if self.optim.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.decay: expected cosine, linear or constant, got {self.optim.decay!r}")

    def model_config(self):
        """The VDiT config the preset and overrides give (context_dim follows the text encoder at build time)."""
        from models.vdit import PRESETS, vdit_config

        if self.model.preset not in PRESETS:
            raise ConfigError(f"model.preset: unknown preset {self.model.preset!r}; expected one of {sorted(PRESETS)}")
        known = {f.name for f in dataclasses.fields(PRESETS[self.model.preset])}
        unknown = sorted(set(self.model.overrides) - known)
        if unknown:
            raise ConfigError(f"model.overrides.{unknown[0]}: not a VDiTConfig field; expected among {sorted(known)}")
        model_config = vdit_config(self.model.preset, **self.model.overrides)
        if model_config.patch_size < 1 or model_config.patch_frames < 1:
            raise ConfigError("model.overrides: patch_size and patch_frames must be at least 1")
        return model_config


def _lookup(config: Any, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _positive(config: Any, keys: list[str]) -> None:
    for key in keys:
        if _lookup(config, key) <= 0:
            raise ConfigError(f"{key}: expected a value above 0, got {_lookup(config, key)}")


def _non_negative(config: Any, keys: list[str]) -> None:
    for key in keys:
        if _lookup(config, key) < 0:
            raise ConfigError(f"{key}: expected 0 or more, got {_lookup(config, key)}")


def _validate_stage(name: str, stage: CurriculumStage, patch_size: int, patch_frames: int) -> None:
    """A stage's clip shape must split into whole patches: the model cannot run otherwise (say so now, not on a
    GPU an hour into the run)."""
    if stage.steps <= 0 or stage.num_frames <= 0 or stage.size <= 0 or stage.fps <= 0:
        raise ConfigError(f"{name}: steps, num_frames, size and fps must be above 0, got steps={stage.steps} "
                          f"num_frames={stage.num_frames} size={stage.size} fps={stage.fps}")
    if stage.size % patch_size:
        fix = stage.size - stage.size % patch_size
        raise ConfigError(f"{name}: size {stage.size} is not divisible by the model's patch_size {patch_size}; "
                          f"use size {fix} or {fix + patch_size}")
    _validate_stage_source(name, stage)
    if stage.num_frames % patch_frames:
        fix = stage.num_frames - stage.num_frames % patch_frames
        raise ConfigError(f"{name}: num_frames {stage.num_frames} is not divisible by the model's patch_frames "
                          f"{patch_frames}; use num_frames {fix or patch_frames} or {fix + patch_frames}")


STAGE_SOURCES = ("video", "keyframes", "images")  # CurriculumStage.source


def _validate_stage_source(name: str, stage: CurriculumStage) -> None:
    """What a stage reads must be one it can read; the expression and the folder are checked against the data on the
    driver (training/stage_data.py), before any worker starts."""
    if stage.source not in STAGE_SOURCES:
        raise ConfigError(f"{name}: source {stage.source!r} is not one of {', '.join(STAGE_SOURCES)}")
    if stage.source == "images" and not stage.images:
        raise ConfigError(f"{name}: source images needs images: FOLDER (jpg/png/webp with captions)")
    if stage.images and stage.source != "images":
        raise ConfigError(f"{name}: images is read by source images only; set source: images or drop images")
    if stage.source == "images" and stage.where:
        raise ConfigError(f"{name}: where selects curated clips; an image folder has no clips table")
    if stage.source != "video" and stage.num_frames != 1:
        raise ConfigError(f"{name}: source {stage.source} gives one frame per sample; set num_frames: 1")
    if stage.source != "video" and stage.bucket_frames:  # one-frame stages read square centre crops
        raise ConfigError(f"{name}: bucket_frames apply to video stages; drop them from source {stage.source}")


# What a resumed run may change without changing what it computes: where it logs, how often it saves or samples,
# how it is scheduled, where it stops this time.
RESUME_FREE_KEYS = ("data", "output", "stop_after_steps", "accept_data_change", "tracking", "ray", "checkpoint",
                    "sampling.every_steps", "scaling.cpus_per_worker", "scaling.threads_per_worker",
                    "data_loading.prefetch_batches", "data_loading.decode_concurrency", "data_loading.cache",
                    "data_loading.cache_mib", "data_loading.decode_batch_size", "model.compile")


def resume_hash(config: TrainConfig) -> str:
    """sha256 of the resolved config less RESUME_FREE_KEYS: equal for a run and its resumption."""
    data = dataclasses.asdict(config)
    for key in RESUME_FREE_KEYS:
        *parents, last = key.split(".")
        section = data
        for part in parents:
            section = section[part]
        section.pop(last, None)
    if data["buckets"] == dataclasses.asdict(BucketConfig()):  # a run without buckets hashes as before they existed
        del data["buckets"]
        for stage in data["curriculum"]:
            stage.pop("bucket_frames", None)
    for stage in data["curriculum"]:  # a stage reading every curated clip as video hashes as before stages chose
        if (stage.get("source"), stage.get("images"), stage.get("where")) == ("video", "", ""):
            for key in ("source", "images", "where"):
                stage.pop(key)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def parse_ratio(text: str) -> float:
    """"16:9" -> 16/9; one line naming the key for anything else."""
    parts = str(text).split(":")
    try:
        w, h = (float(p) for p in parts)
    except ValueError:
        w = h = 0.0
    if len(parts) != 2 or not (w > 0 and h > 0 and math.isfinite(w / h)):
        raise ConfigError(f"buckets.aspect_ratios: expected width:height such as 16:9, got {text!r}")
    return w / h


def validate_buckets(config: BucketConfig, curriculum: list[CurriculumStage], patch_frames: int) -> None:
    """Every bucket mistake a config can hold, as one line naming its key (TrainConfig.validate calls this)."""
    for text in config.aspect_ratios:
        parse_ratio(text)
    if not math.isfinite(config.max_aspect_error) or config.max_aspect_error <= 0:
        raise ConfigError(f"buckets.max_aspect_error: expected a number above 0, got {config.max_aspect_error}")
    for index, stage in enumerate(curriculum):
        key = f"curriculum[{index}] ({stage.name}).bucket_frames"
        if stage.bucket_frames and not config.aspect_ratios:
            raise ConfigError(f"{key}: frame counts of buckets need buckets.aspect_ratios (e.g. [\"16:9\", \"1:1\"])")
        for frames in stage.bucket_frames:
            if frames <= 0 or frames % patch_frames:
                raise ConfigError(f"{key}: {frames} frames; expected counts above 0 divisible by the model's "
                                  f"patch_frames {patch_frames}")
