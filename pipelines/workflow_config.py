"""The config of `reelforge run` (configs/quickstart.yaml is one): the steps to run, the workdir, the dumps, and one
section per step, each the config of that step's own subcommand."""

from __future__ import annotations

from dataclasses import dataclass, field

from curation.config import CurateConfig
from training.config import RayConfig, TrainConfig
from training.distill import DistillConfig
from training.evaluate import EvaluateConfig
from training.latent_encode import EncodeConfig
from training.vae.config import VAETrainConfig

PIXEL_STEPS = ["curate", "train", "distill", "evaluate"]  # the default: the model diffuses pixels


@dataclass
class SampleDumpConfig:
    """The generated dumps used when `input` is empty: one to train on, one held out for evaluation."""

    num_videos: int = 60  # the quickstart uses 800: the demo needs many distinct clips to learn the direction word
    seed: int = 0
    heldout_videos: int = 12  # a second dump (another seed): its captions are the evaluation prompts
    heldout_seed: int = 1
    shape_size: float = 0.25  # the shapes' side as a fraction of the frame height


@dataclass
class WorkflowConfig:
    workdir: str = "runs/quickstart"  # every step writes under here (curated/, train/, distill/, evaluate/)
    input: str = ""  # a video dump; empty: generate the sample dump under workdir/sample-dump
    heldout_input: str = ""  # a held-out video dump for evaluation; empty with `input` empty: generated
    tracking_uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db for every step
    experiment: str = "reelforge"  # the parent run and every step's nested run (nesting needs one experiment)
    steps: list[str] = field(default_factory=lambda: list(PIXEL_STEPS))
    # The cluster every step runs on, handed down to each step (a step section's own `ray` is for its standalone
    # command); the tracking store and experiment above are handed down the same way.
    ray: RayConfig = field(default_factory=RayConfig)
    sample_dump: SampleDumpConfig = field(default_factory=SampleDumpConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    # step train-vae: its output's vae/ becomes train.codec (kind reelforge-vae) for encode, train and what follows
    train_vae: VAETrainConfig = field(default_factory=VAETrainConfig)
    # step encode: its codec, text, curriculum and windows_per_clip are the train section's (set them there), so
    # the cache holds exactly what train reads; with encode, train and distill read the cache
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(max_videos=48))
