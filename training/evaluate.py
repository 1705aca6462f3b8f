"""The evaluation of exported models, without MLflow: every model (a teacher and its distilled students) generates the
same prompts from the same noise, is scored against held-out real clips, and lands in one comparison table and grid.

The prompts are the captions of the held-out clips, whose pixels are the real side of the Fréchet distance and of the
motion distribution; with no held-out data, a list of prompts is generated and only the reference-free metrics are
computed. Scorers on untrained weights (the embedded tiny CLIP) are named in the results and marked in the table.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("reelforge.evaluate")

# The sample dump's grammar (curation/sample_dump.py), like the training samples, so prompt adherence can score them.
DEFAULT_PROMPTS = [
    "a red triangle moving right on a black background",
    "a yellow square moving up on a grey background",
    "a blue circle moving left on a grey background",
    "a white square moving down on a grey background",
]
UNTRAINED_NOTE = "scores from untrained weights are not meaningful"
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8")
ADHERENCE = ("color_accuracy", "direction_accuracy", "both_accuracy", "background_accuracy")


# ---------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelSpec:
    path: str = ""  # an exported model folder (`model/` of a train or distill run), or the run's output holding one
    name: str = ""  # empty: "teacher-<steps>", or "student-<steps>" for a model whose config.json has distilled_from
    num_steps: int | None = None  # None: config.json's sampling.num_steps (how the model is meant to be sampled)
    cfg_scale: float | None = None  # None: config.json's sampling.cfg_scale (1.0 for a guidance-distilled student)
    sampler: str = "ddim"  # "ddim" | "dpmpp-2m" (DPM-Solver++ 2M: the teacher in 10-20 steps without retraining)
    # "onnxruntime" | "onnxruntime-int8": the denoiser runs under ONNX Runtime, on the same prompts and seeds as the
    # PyTorch models (so int8 is compared with fp32): path is a `reelforge export-onnx` folder (its weights must be
    # the backend's), or a model folder exported for the evaluation (int8: ORT dynamic quantisation)
    backend: str = "torch"


@dataclass
class ClipScorerConfig:
    """The open_clip model behind clipsim and frechet_clip_frame (same keys as curation's clip_scores)."""

    model_name: str = "tiny"  # "tiny" (random init: its scores mean nothing), an open_clip name (ViT-L-14), hf-hub:
    pretrained: str | None = None  # an open_clip tag (openai) or a local checkpoint file; None: random init
    pretrained_sha256: str | None = None  # of a checkpoint file named by `pretrained`; checked before it loads
    precision: str = "fp32"
    num_frames: int = 8  # evenly spaced frames per video that are embedded


@dataclass
class MetricsConfig:
    clip: ClipScorerConfig = field(default_factory=ClipScorerConfig)
    # The standard FVD: a local i3d_torchscript.pt (see training.metrics.I3DExtractor); None: no FVD is computed.
    i3d_path: str | None = None
    i3d_sha256: str | None = None  # required with i3d_path (`sha256sum i3d_torchscript.pt`), checked before loading
    i3d_num_frames: int = 16  # the standard protocol's 16; another count names the metric fvd_i3d_<n>f
    min_confidence: float = 0.5  # prompt adherence: a detection below this counts as a miss


@dataclass
class TrackingConfig:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db
    experiment: str = "reelforge-evaluate"
    parent_run_id: str | None = None  # nest the evaluate run under this run (e.g. the workflow's)


@dataclass
class EvaluateConfig:
    models: list[ModelSpec] = field(default_factory=list)  # the first is the reference (the teacher)
    # The first model again with other sampling, evaluated after `models`: each entry's sampler, num_steps and
    # cfg_scale (its path is left empty), e.g. [{sampler: dpmpp-2m, num_steps: 16}] for the teacher under DPM-Solver++
    # beside its students at equal network evaluations.
    teacher_samplings: list[ModelSpec] = field(default_factory=list)
    # Models (by their name in the table, e.g. student-4) evaluated again under ONNX Runtime with fp32 and with int8
    # weights, exported for the evaluation: rows <name>-onnx-fp32 and <name>-onnx-int8.
    onnx_models: list[str] = field(default_factory=list)
    data: str = ""  # a curated dataset of HELD-OUT clips: captions are the prompts, pixels the real side
    max_videos: int = 16  # held-out clips (and so videos per model) evaluated
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))  # only used when data is empty
    seed: int = 0  # prompt i is generated from seed + i by every model
    # The format every model generates and real clips are decoded to; None: the first model's native format (the
    # last stage of its curriculum).
    num_frames: int | None = None
    size: int | None = None
    fps: float | None = None
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    grid_prompts: int = 8  # columns of grid.gif: the first N prompts
    gif_cell_px: int = 64  # videos are enlarged (nearest) to at least this side in the GIFs
    device: str = "auto"  # "auto": cuda when available, else cpu
    # Models made with different codecs (their config.json's `codec` id) are refused: their metrics then measure
    # the codecs as much as the models. true: compare them anyway (e.g. a latent model against a pixel one).
    allow_mixed_codecs: bool = False
    output: str = ""  # comparison table, GIFs, results.json, and the MLflow store when none is configured
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def model_specs(self) -> list[ModelSpec]:
        """`models`, then each of `teacher_samplings` with the first model's path."""
        from dataclasses import replace

        return [*self.models, *(replace(s, path=self.models[0].path) for s in self.teacher_samplings)]

    def validate(self) -> None:
        from models.guided_sampling import SAMPLERS
        from training.config import ConfigError

        if not self.models:
            raise ConfigError("models: name at least one exported model, e.g. --set 'models=[{path: runs/x/model}]'")
        for i, spec in enumerate(self.models):
            if not spec.path:
                raise ConfigError(f"models[{i}].path: empty; expected an exported model folder")
        for i, spec in enumerate(self.teacher_samplings):
            if spec.path:
                raise ConfigError(f"teacher_samplings[{i}].path: leave it empty (the first model's is used), got "
                                  f"{spec.path!r}; list another model under models")
        for key, specs in (("models", self.models), ("teacher_samplings", self.teacher_samplings)):
            for i, spec in enumerate(specs):
                if spec.num_steps is not None and spec.num_steps < 1:
                    raise ConfigError(f"{key}[{i}].num_steps: expected >= 1, got {spec.num_steps}")
                if spec.sampler not in SAMPLERS:
                    raise ConfigError(f"{key}[{i}].sampler: {spec.sampler!r} is not one of {', '.join(SAMPLERS)}")
                if spec.backend not in BACKENDS:
                    raise ConfigError(f"{key}[{i}].backend: {spec.backend!r} is not one of {', '.join(BACKENDS)}")
        names = [s.name for s in self.model_specs() if s.name]
        if len(set(names)) != len(names):
            raise ConfigError(f"models: the names {names} are not unique")
        if self.max_videos < 2:
            raise ConfigError(f"max_videos: expected >= 2 (a Fréchet distance needs a covariance), got "
                              f"{self.max_videos}")
        if not self.data and not self.prompts:
            raise ConfigError("data and prompts are both empty: give a held-out curated dataset or a list of prompts")
        if self.num_frames is not None and self.num_frames < 2:
            raise ConfigError(f"num_frames: expected >= 2 (flicker and motion compare frames), got {self.num_frames}")
        if self.metrics.i3d_path and self.num_frames is not None and self.num_frames < self.metrics.i3d_num_frames:
            raise ConfigError(f"num_frames={self.num_frames} is shorter than metrics.i3d_num_frames="
                              f"{self.metrics.i3d_num_frames}: generate longer videos or lower i3d_num_frames")
        if self.grid_prompts < 1:
            raise ConfigError(f"grid_prompts: expected >= 1, got {self.grid_prompts}")
        # The I3D file is TorchScript, code as well as weights (no tensors-only form exists): only a pinned file loads.
        i3d_path, i3d_sha256 = self.metrics.i3d_path, self.metrics.i3d_sha256
        if i3d_path and not (i3d_sha256 and re.fullmatch(r"[0-9a-fA-F]{64}", i3d_sha256.strip())):
            what = "expected 64 hex digits for" if i3d_sha256 else "required with"
            raise ConfigError(f"metrics.i3d_sha256: {what} metrics.i3d_path={i3d_path} (`sha256sum {i3d_path}` "
                              "prints it)")
        from models.clip_scorer import weights_problem

        clip = self.metrics.clip
        problem = weights_problem(clip.model_name, clip.pretrained, clip.pretrained_sha256)
        if problem:
            raise ConfigError(f"metrics.clip: {problem}")


# ---------------------------------------------------------------------------------------------------------------------
# Models and the evaluation format


@dataclass
class ResolvedModel:
    """A ModelSpec with its folder found and its name and sampling settings filled in from config.json."""

    name: str
    path: str
    num_steps: int
    cfg_scale: float
    config: dict
    sampler: str = "ddim"
    backend: str = "torch"

    @property
    def role(self) -> str:
        return "student" if "distilled_from" in self.config else "teacher"

    @property
    def model_evaluations_per_video(self) -> int:
        from training.metrics import model_evaluations_per_video

        return model_evaluations_per_video(self.num_steps, self.cfg_scale)


def model_folder(path: str | Path) -> Path:
    """The folder holding config.json: `path` itself, `path/model` for a train/distill run's output, or
    `path/artifacts/model` for the MLflow pyfunc model a registered version is (training/pyfunc.py)."""
    path = Path(path)
    for candidate in (path, path / "model", path / "artifacts" / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(f"{path} has no config.json (nor model/config.json): expected an exported model, the "
                            "`model/` folder of `reelforge train`")


def resolve_models(specs: list[ModelSpec]) -> list[ResolvedModel]:
    """Read each model's config.json: sampling defaults, and a derived name ("teacher-32", "student-4",
    "teacher-dpmpp-16" under DPM-Solver++) when none is given; repeated derived names get "-2", "-3"."""
    from training.config import ConfigError

    resolved: list[ResolvedModel] = []
    taken = {s.name for s in specs if s.name}
    for i, spec in enumerate(specs):
        folder = model_folder(spec.path)
        config = json.loads((folder / "config.json").read_text())
        sampling = config.get("sampling") or {}
        num_steps = spec.num_steps if spec.num_steps is not None else sampling.get("num_steps")
        cfg_scale = spec.cfg_scale if spec.cfg_scale is not None else sampling.get("cfg_scale")
        if num_steps is None or cfg_scale is None:
            raise ConfigError(f"models[{i}]: {folder}/config.json has no sampling.num_steps/cfg_scale; set "
                              f"models[{i}].num_steps and models[{i}].cfg_scale")
        name = spec.name
        if not name:
            sampler = "" if spec.sampler == "ddim" else f"{spec.sampler.split('-')[0]}-"
            base = f"{'student' if 'distilled_from' in config else 'teacher'}-{sampler}{int(num_steps)}"
            if spec.backend != "torch":  # student-4-onnx-int8
                base += f"-onnx-{_onnx_weights(folder, spec.backend)}"
            name, k = base, 2
            while name in taken:
                name, k = f"{base}-{k}", k + 1
            taken.add(name)
        resolved.append(ResolvedModel(name, str(folder), int(num_steps), float(cfg_scale), config, spec.sampler,
                                      spec.backend))
    return resolved


def _onnx_weights(folder: Path, backend: str) -> str:
    """"fp32" or "int8", the backend's: an export folder's onnx.json (`reelforge export-onnx`) must agree."""
    from training.config import ConfigError

    weights = "int8" if backend == "onnxruntime-int8" else "fp32"
    description = folder / "onnx.json"
    if description.is_file():
        written = str(json.loads(description.read_text()).get("weights", "fp32"))
        if written != weights:
            raise ConfigError(f"{folder} holds {written} ONNX weights: use backend "
                              f"{'onnxruntime-int8' if written == 'int8' else 'onnxruntime'} for it")
    return weights


def model_codec(model: ResolvedModel) -> str:
    """The id of the codec a model was made with (exports from before codecs were recorded are pixel models)."""
    return str(model.config.get("codec", "pixels"))


def check_codecs(models: list[ResolvedModel], allow_mixed: bool) -> None:
    """One codec for every model, unless `allow_mixed`: else one line naming the first two that differ."""
    from training.config import ConfigError

    first = models[0]
    for model in models[1:]:
        if model_codec(model) != model_codec(first) and not allow_mixed:
            raise ConfigError(f"models: {model.name} was made with codec {model_codec(model)!r}, {first.name} with "
                              f"{model_codec(first)!r}; set allow_mixed_codecs: true to compare them anyway")


def evaluation_models(config: EvaluateConfig) -> list[ResolvedModel]:
    """Every row of the evaluation: `models`, `teacher_samplings` and the ONNX rows, resolved from config.json and
    checked to share one codec (unless config.allow_mixed_codecs)."""
    models = resolve_models(config.model_specs())
    models += onnx_rows(models, config.onnx_models)
    check_codecs(models, config.allow_mixed_codecs)
    return models


def onnx_rows(models: list[ResolvedModel], names: list[str]) -> list[ResolvedModel]:
    """Each named model again under ONNX Runtime, fp32 then int8 (EvaluateConfig.onnx_models)."""
    from dataclasses import replace

    from training.config import ConfigError

    by_name = {m.name: m for m in models}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ConfigError(f"onnx_models: no model named {', '.join(missing)} (the models are "
                          f"{', '.join(by_name)})")
    return [replace(by_name[n], name=f"{n}-onnx-{w}", backend=b) for n in names
            for w, b in (("fp32", "onnxruntime"), ("int8", "onnxruntime-int8"))]


def load_for_evaluation(spec: ResolvedModel, device: torch.device, workdir: Path):
    """The model as training.export.LoadedModel, its denoiser under ONNX Runtime for the onnxruntime backends: from
    an export-onnx folder, or exported (and for int8 quantised) into `workdir` from the model's own weights."""
    from training.export import load_model

    if spec.backend == "torch":
        return load_model(spec.path, str(device))
    from training.onnx_export import OnnxDenoiser, export_denoiser, load_onnx_model, quantize_denoiser, trained_shapes

    if (Path(spec.path) / "onnx.json").is_file():
        return load_onnx_model(spec.path, device)
    loaded = load_model(spec.path, "cpu")
    graph = workdir / f"{file_name(spec.name)}.onnx"
    export_denoiser(loaded.model, graph, trained_shapes(loaded, loaded.codec))
    if spec.backend == "onnxruntime-int8":
        quantize_denoiser(graph, graph.with_suffix(".int8.onnx"))
        graph = graph.with_suffix(".int8.onnx")
    loaded.model = OnnxDenoiser(graph, device)
    return loaded


@dataclass
class VideoFormat:
    num_frames: int
    size: int
    fps: float


def video_format(config: EvaluateConfig, reference: ResolvedModel) -> VideoFormat:
    """The configured frames/size/fps, each None taken from the reference model's last curriculum stage."""
    from training.config import ConfigError

    native = (reference.config.get("curriculum") or [{}])[-1]
    values = {}
    for key in ("num_frames", "size", "fps"):
        value = getattr(config, key)
        value = native.get(key) if value is None else value
        if value is None:
            raise ConfigError(f"{key}: {reference.path}/config.json has no curriculum to take it from; set {key}")
        values[key] = value
    fmt = VideoFormat(int(values["num_frames"]), int(values["size"]), float(values["fps"]))
    if fmt.num_frames < 2:
        raise ConfigError(f"num_frames: expected >= 2 (flicker and motion compare frames), got {fmt.num_frames}")
    if config.metrics.i3d_path and fmt.num_frames < config.metrics.i3d_num_frames:
        raise ConfigError(f"the videos have {fmt.num_frames} frames, fewer than metrics.i3d_num_frames="
                          f"{config.metrics.i3d_num_frames}: set num_frames, or lower metrics.i3d_num_frames")
    return fmt


# ---------------------------------------------------------------------------------------------------------------------
# Real clips and generated videos


@dataclass
class RealClips:
    videos: np.ndarray  # (N, T, H, W, 3) uint8 at the evaluation format
    captions: list[str]
    clip_ids: list[str]


def load_real_clips(data: str, fmt: VideoFormat, max_videos: int) -> RealClips:
    """The first `max_videos` kept clips (by clip_id) that have a caption and enough frames, decoded at `fmt` the
    way training decodes them (frames at fmt.fps from the clip's middle, short side resized, centre-cropped).
    `data` is a curated dataset, `DIR@vN` for its version N (default: the newest)."""
    from training.config import CurriculumStage
    from training.data import decode_row
    from training.dataset import ClipTable

    table = ClipTable.open(data)
    meta = table.metadata()
    stage = CurriculumStage(num_frames=fmt.num_frames, fps=fmt.fps, size=fmt.size)  # decoded as training does
    videos, captions, ids = [], [], []
    skipped = 0
    for row in sorted(range(len(table)), key=meta["clip_id"].__getitem__):
        if len(videos) == max_videos:
            break
        clips = decode_row(table.take([row])[0], stage) if (meta["caption"][row] or "").strip() else []
        if not clips:
            skipped += 1
            continue
        videos.append(clips[0])
        captions.append(meta["caption"][row])
        ids.append(meta["clip_id"][row])
    if len(videos) < 2:
        raise ValueError(f"{table.shown}: only {len(videos)} kept clips with a caption and at least {fmt.num_frames} "
                         f"frames ({len(table)} kept, {skipped} too short or uncaptioned); a Fréchet distance needs 2 "
                         "or more")
    if skipped:
        log.info("skipped %d held-out clips without a caption or with fewer than %d frames", skipped, fmt.num_frames)
    return RealClips(np.stack(videos), captions, ids)


def generate_videos(loaded, prompts: list[str], fmt: VideoFormat, num_steps: int, cfg_scale: float, seed: int,
                    device: torch.device, sampler: str = "ddim") -> tuple[np.ndarray, float]:
    """(N, T, H, W, 3) uint8 videos, prompt i from noise seed + i, and the mean wall seconds per video.

    One prompt per call, so a video depends only on its prompt and seed, never on what else is in the batch, and
    the time is a per-video latency (a latent model's includes decoding through its codec). A one-step warm-up call
    first keeps one-off setup out of the timing. A latent model denoises at its codec's latent shape of `fmt`."""
    from training.metrics import timed_generation

    codec = loaded.codec
    channels, frames, size, _ = latent_format(loaded, fmt)
    kwargs = {"num_frames": frames, "size": size, "cfg_scale": cfg_scale, "in_channels": channels, "device": device,
              "sampler": sampler, "clip_x0": codec.clip_range}
    sample_decoded(loaded, prompts[:1], num_steps=1, seed=seed, **kwargs)
    videos, seconds = [], 0.0
    for i, prompt in enumerate(prompts):
        video, elapsed = timed_generation(sample_decoded, loaded, [prompt], num_steps=num_steps, seed=seed + i,
                                          **kwargs)
        videos.append(video[0])
        seconds += elapsed
    return np.stack(videos), seconds / len(prompts)


def latent_format(loaded, fmt: VideoFormat) -> tuple[int, int, int, int]:
    """(channels, frames, height, width) the model denoises for videos of `fmt`: its codec's latent shape, e.g. 5
    frames of 32 px -> 2 latent frames of 8 px through a 4x4x4 causal VAE. One line when the codec cannot take it."""
    codec = loaded.codec
    if not codec.frame_count_ok(fmt.num_frames) or fmt.size % codec.space_compression:
        raise ValueError(f"codec {codec.id!r} cannot take {fmt.num_frames} frames of {fmt.size} px (a causal VAE "
                         f"takes 1 + {codec.time_compression}k frames; sizes divisible by {codec.space_compression}): "
                         "set num_frames and size accordingly")
    shape = codec.latent_shape(fmt.num_frames, fmt.size, fmt.size)
    if shape[0] != loaded.model.config.in_channels:
        raise ValueError(f"the model denoises {loaded.model.config.in_channels} channels but its codec {codec.id!r} "
                         f"has {shape[0]}")
    return shape


def sample_decoded(loaded, prompts: list[str], **kwargs) -> np.ndarray:
    """training.sample.generate in the model's space, decoded through its codec: (B, T, H, W, 3) uint8."""
    from training.sample import generate

    return loaded.codec.decode(generate(loaded.model, loaded.text_encoder, loaded.schedule, prompts, **kwargs))


# ---------------------------------------------------------------------------------------------------------------------
# Scoring


class Scorers:
    """The CLIP scorer and the Fréchet feature extractors, loaded once for every model."""

    def __init__(self, config: MetricsConfig, device: str = "auto"):
        from models.clip_scorer import ClipScorer, resolve_device
        from training.metrics import ClipFrameExtractor, I3DExtractor, frechet_name

        self.config = config
        self.clip = ClipScorer(config.clip.model_name, config.clip.pretrained, device, config.clip.precision,
                               sha256=config.clip.pretrained_sha256)
        self.extractors = [ClipFrameExtractor(self.clip, config.clip.num_frames)]
        if config.i3d_path:
            self.extractors.append(I3DExtractor(config.i3d_path, config.i3d_sha256, config.i3d_num_frames,
                                                str(resolve_device(device))))
        self.frechet_names = [frechet_name(e) for e in self.extractors]
        # Every metric computed from the CLIP weights; the I3D file, when given, is the trained detector.
        self.untrained_metrics = [self.frechet_names[0], "clipsim_mean"] if self.clip.untrained else []
        self.labels = {"clip": self.clip.name}
        if config.i3d_path:
            self.labels["i3d"] = str(config.i3d_path)

    def per_video(self, videos: np.ndarray, captions: list[str], fps: float) -> dict[str, np.ndarray]:
        from training.metrics import clipsim, flicker, motion_scores

        return {"clipsim": clipsim(self.clip, videos, captions, self.config.clip.num_frames),
                "flicker": flicker(videos), "motion": motion_scores(videos, fps)}

    def feature_statistics(self, videos: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        from training.metrics import feature_statistics

        return [feature_statistics(e.features(videos)) for e in self.extractors]


@dataclass
class RealReference:
    """What every model is compared with: the real clips' per-video scores and feature statistics."""

    scores: dict[str, np.ndarray]
    statistics: list[tuple[np.ndarray, np.ndarray]]
    metrics: dict[str, float]


def _nanmedian(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def summary_metrics(scores: dict[str, np.ndarray], videos: np.ndarray, captions: list[str],
                    min_confidence: float) -> dict[str, float]:
    """The reference-free metrics of one set of videos: means of the per-video scores and prompt adherence."""
    from training.metrics import prompt_adherence

    adherence = prompt_adherence(videos, captions, min_confidence)
    return {"clipsim_mean": float(np.mean(scores["clipsim"])), "flicker_mean": float(np.mean(scores["flicker"])),
            "motion_median": _nanmedian(scores["motion"]), **{k: float(adherence[k]) for k in ADHERENCE},
            "prompts_scored": float(adherence["num_scored"]), "num_videos": float(len(videos))}


def real_reference(real: RealClips, scorers: Scorers, fmt: VideoFormat) -> RealReference:
    scores = scorers.per_video(real.videos, real.captions, fmt.fps)
    metrics = summary_metrics(scores, real.videos, real.captions, scorers.config.min_confidence)
    return RealReference(scores, scorers.feature_statistics(real.videos), metrics)


def compare_with_real(videos: np.ndarray, scores: dict[str, np.ndarray], scorers: Scorers,
                      reference: RealReference | None) -> dict[str, float]:
    """Fréchet distances per extractor and the motion distribution distance; NaN without a real reference."""
    from training.metrics import frechet_distance, motion_distribution_distance

    nan = float("nan")
    metrics = {name: nan for name in scorers.frechet_names}
    metrics.update(motion_wasserstein=nan, motion_median_difference=nan)
    if reference is None:
        return metrics
    for name, (mu_real, sigma_real), (mu, sigma) in zip(scorers.frechet_names, reference.statistics,
                                                        scorers.feature_statistics(videos), strict=True):
        metrics[name] = frechet_distance(mu_real, sigma_real, mu, sigma)
    try:
        metrics.update(motion_distribution_distance(reference.scores["motion"], scores["motion"]))
    except ValueError as err:  # no finite motion score on one side: report NaN, not a failed evaluation
        log.warning("motion distribution distance not computed: %s", err)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class ModelResult:
    name: str
    path: str
    role: str  # "teacher" | "student"
    num_steps: int
    cfg_scale: float
    config: dict  # the model's config.json
    metrics: dict[str, float]  # the table's columns, identical names for every model
    per_video: dict[str, list[float]]  # clipsim, flicker, motion per prompt
    videos: np.ndarray  # (N, T, H, W, 3) uint8
    sampler: str = "ddim"
    backend: str = "torch"
    started_at: float = 0.0  # epoch seconds: loading, generating and scoring this model (its run's duration)
    finished_at: float = 0.0


@dataclass
class EvaluationResult:
    models: list[ModelResult]
    prompts: list[str]
    seeds: list[int]
    clip_ids: list[str]  # the held-out clip of each prompt; empty without data
    format: VideoFormat
    real: dict[str, float] | None  # the reference-free metrics of the real clips themselves; None without data
    real_videos: np.ndarray | None
    columns: list[str]  # metric names in table order
    untrained_metrics: list[str]  # columns computed with untrained weights
    scorers: dict[str, str]  # which weights each scorer used
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict]:
        """One row per model: model, path, then `columns`."""
        return [{"model": m.name, "path": m.path, **{c: m.metrics[c] for c in self.columns}} for m in self.models]


def metric_columns(frechet_names: list[str]) -> list[str]:
    return ["num_steps", "cfg_scale", "model_evaluations_per_video", "seconds_per_video", "speedup_vs_teacher",
            *frechet_names,
            "clipsim_mean", "flicker_mean", "motion_median", "motion_wasserstein", "motion_median_difference",
            *ADHERENCE, "prompts_scored", "num_videos"]


def evaluate(config: EvaluateConfig, real: RealClips | None = None) -> EvaluationResult:
    """Generate and score every model of `config.models`. `real`: held-out clips already decoded at the evaluation
    format (tests, notebooks); by default they are read from `config.data`, and with no data there are none."""
    from models.clip_scorer import resolve_device

    config.validate()
    models = evaluation_models(config)
    fmt = video_format(config, models[0])
    if real is None and config.data:
        real = load_real_clips(config.data, fmt, config.max_videos)
    if real is not None and real.videos.shape[1:4] != (fmt.num_frames, fmt.size, fmt.size):
        raise ValueError(f"real clips are {real.videos.shape[1:4]} (frames, H, W), the evaluation format is "
                         f"{(fmt.num_frames, fmt.size, fmt.size)}")
    prompts = list(real.captions) if real is not None else list(config.prompts[:config.max_videos])
    seeds = [config.seed + i for i in range(len(prompts))]
    device = resolve_device(config.device)
    scorers = Scorers(config.metrics, config.device)
    notes = []
    if real is None:
        notes.append("no held-out data (data is empty): the prompts come from `prompts`, and the Fréchet distances "
                     "and the motion distribution against real clips were not computed")
    else:
        notes.append(f"Fréchet distances from {len(prompts)} videos per side are biased upwards at small N; compare "
                     "them only at equal N (the standard FVD uses 2048)")
    if scorers.untrained_metrics:
        notes.append(f"{', '.join(scorers.untrained_metrics)} come from {scorers.clip.name}: {UNTRAINED_NOTE}")
    reference = real_reference(real, scorers, fmt) if real is not None else None

    results = []
    workdir = tempfile.TemporaryDirectory(prefix="reelforge-evaluate-onnx-")  # graphs exported for this evaluation
    for spec in models:
        started_at = time.time()
        log.info("evaluating %s (%s): %d %s steps, cfg %g, %d videos of %d frames at %d px", spec.name, spec.path,
                 spec.num_steps, spec.sampler, spec.cfg_scale, len(prompts), fmt.num_frames, fmt.size)
        loaded = load_for_evaluation(spec, device, Path(workdir.name))
        videos, seconds = generate_videos(loaded, prompts, fmt, spec.num_steps, spec.cfg_scale, config.seed, device,
                                          spec.sampler)
        del loaded  # one model on the device at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
        scores = scorers.per_video(videos, prompts, fmt.fps)
        metrics = {"num_steps": float(spec.num_steps), "cfg_scale": spec.cfg_scale,
                   "model_evaluations_per_video": float(spec.model_evaluations_per_video),
                   "seconds_per_video": seconds,
                   **compare_with_real(videos, scores, scorers, reference),
                   **summary_metrics(scores, videos, prompts, config.metrics.min_confidence)}
        results.append(ModelResult(spec.name, spec.path, spec.role, spec.num_steps, spec.cfg_scale, spec.config,
                                   metrics, {k: v.tolist() for k, v in scores.items()}, videos, spec.sampler,
                                   spec.backend, started_at, time.time()))
    workdir.cleanup()
    add_speedups(results)
    notes += quantisation_notes(results)
    columns = metric_columns(scorers.frechet_names)
    return EvaluationResult(results, prompts, seeds, list(real.clip_ids) if real is not None else [], fmt,
                            reference.metrics if reference is not None else None,
                            real.videos if real is not None else None, columns, scorers.untrained_metrics,
                            scorers.labels, notes)


def add_speedups(results: list[ModelResult]) -> None:
    """speedup_vs_teacher: the first model's (the reference's) seconds per video over each model's, measured on the
    same prompts, device and machine (NaN when a time is not positive)."""
    reference = results[0].metrics["seconds_per_video"] if results else 0.0
    for row in results:
        seconds = row.metrics["seconds_per_video"]
        row.metrics["speedup_vs_teacher"] = reference / seconds if reference > 0 and seconds > 0 else float("nan")


QUANTISED_TOLERANCE_POINTS = 5.0  # an int8 model is worth keeping if no adherence accuracy drops by more


def quantisation_notes(results: list[ModelResult]) -> list[str]:
    """For each int8 row (<name>-onnx-int8) with an fp32 twin (<name>-onnx-fp32, else <name>): its prompt adherence
    against fp32's on the same prompts and seeds, and whether it is within QUANTISED_TOLERANCE_POINTS to keep."""
    by_name = {r.name: r for r in results}
    notes = []
    for row in results:
        if not row.name.endswith("-onnx-int8"):
            continue
        base = row.name.removesuffix("-onnx-int8")
        twin = by_name.get(f"{base}-onnx-fp32") or by_name.get(base)
        if twin is None or not row.metrics.get("prompts_scored"):
            continue
        drops = {k: 100 * (twin.metrics[k] - row.metrics[k]) for k in ADHERENCE}
        worst = max(drops, key=drops.get)
        verdict = "keep it" if drops[worst] <= QUANTISED_TOLERANCE_POINTS else "drop it"
        changes = ", ".join(f"{k} {twin.metrics[k]:.2f} -> {row.metrics[k]:.2f}" for k in ADHERENCE)
        notes.append(f"{row.name} against {twin.name}: {changes}; largest drop {drops[worst]:.1f} points "
                     f"({worst}), {'within' if verdict == 'keep it' else 'beyond'} {QUANTISED_TOLERANCE_POINTS:g}: "
                     f"{verdict}; seconds_per_video {twin.metrics['seconds_per_video']:.3g} -> "
                     f"{row.metrics['seconds_per_video']:.3g}")
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def video_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """R arrays of (B, T, H, W, 3) -> (T, R*(H+pad)-pad, B*(W+pad)-pad, 3): one row per array, one column per video."""
    from training.sample import tile

    strips = np.stack([tile(r, pad) for r in rows])  # (R, T, H, B*(W+pad)-pad, 3)
    stacked = tile(strips.transpose(0, 1, 3, 2, 4), pad)  # H and W swapped: (T, Wrow, R*(H+pad)-pad, 3)
    return stacked.transpose(0, 2, 1, 3)


def enlarge(videos: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (B, T, H, W, 3) by a whole factor so each video is at least `min_side`."""
    factor = max(1, -(-min_side // min(videos.shape[2:4])))
    return videos.repeat(factor, axis=2).repeat(factor, axis=3)


def file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def _csv_value(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def _md_value(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def comparison_markdown(result: EvaluationResult, grid_columns: int) -> str:
    marked = set(result.untrained_metrics)
    header = ["model", *[f"{c} †" if c in marked else c for c in result.columns]]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in result.rows():
        lines.append("| " + " | ".join([row["model"], *[_md_value(row[c]) for c in result.columns]]) + " |")
    fmt = result.format
    lines += ["", f"{len(result.prompts)} prompts, {fmt.num_frames} frames at {fmt.fps:g} fps, {fmt.size}x{fmt.size} "
              f"px; every model generated prompt i from the noise of seed {result.seeds[0]} + i."]
    if marked:
        lines.append(f"† computed with untrained weights ({result.scorers['clip']}): {UNTRAINED_NOTE}.")
    if result.real is not None:
        real = ", ".join(f"{k} {_md_value(result.real[k])}" for k in ("clipsim_mean", "flicker_mean", "motion_median",
                                                                      *ADHERENCE))
        lines.append(f"Real held-out clips (reference): {real}.")
    lines += ["", "Models:"] + [f"- {m.name}: {m.path} ({m.sampler}, {m.num_steps} steps, cfg {m.cfg_scale:g}, "
                                f"{m.backend})" for m in result.models]
    lines += ["", "Notes:"] + [f"- {note}" for note in result.notes]
    lines += ["", f"grid.gif: rows are the models in the order above, columns the first {grid_columns} prompts "
              "of prompts.txt."]
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


SHEET_COLUMNS = 8  # samples/<model>.gif: prompts per row
CHART_FILE = "speed_vs_quality.png"


def model_label(model: ModelResult) -> str:
    """What a grid row says of its model: name, sampling, measured speed."""
    backend = "" if model.backend == "torch" else f", {model.backend}"
    return (f"{model.name}\n{model.num_steps} {model.sampler} steps, cfg {model.cfg_scale:g}{backend}\n"
            f"{model.metrics['seconds_per_video']:.3g} s/video")


def write_outputs(result: EvaluationResult, directory: str | Path, grid_prompts: int = 8,
                  cell_px: int = 64) -> dict[str, Path]:
    """comparison.csv/.md, grid.gif (rows: models, columns: the first `grid_prompts` prompts, labelled),
    samples/<model>.gif (every prompt of one model, labelled, in rows of SHEET_COLUMNS; samples/real.gif for the
    held-out clips), speed_vs_quality.png, prompts.txt and results.json."""
    from training.labelled_grid import labelled_grid, labelled_sheet
    from training.sample import write_gif
    from training.speed_quality_chart import write_speed_quality_chart

    directory = Path(directory)
    samples = directory / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for stale in samples.glob("*.gif"):  # a rerun with other models leaves no GIF of a model it did not evaluate
        stale.unlink()
    fps = result.format.fps
    written: dict[str, Path] = {}

    columns = ["model", "path", *result.columns, "untrained_metrics"]
    path = directory / "comparison.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in result.rows():
            row["untrained_metrics"] = ";".join(result.untrained_metrics)
            writer.writerow([_csv_value(row[c]) for c in columns])
    written["comparison.csv"] = path

    count = min(grid_prompts, len(result.prompts))
    path = directory / "comparison.md"
    path.write_text(comparison_markdown(result, count))
    written["comparison.md"] = path

    labels = [f"{i}: {prompt}" for i, prompt in enumerate(result.prompts)]
    grid = labelled_grid([m.videos[:count] for m in result.models], cell_px, [model_label(m) for m in result.models],
                         labels[:count])
    write_gif(grid, directory / "grid.gif", fps, min_side=0)
    written["grid.gif"] = directory / "grid.gif"
    for model in result.models:
        path = samples / f"{file_name(model.name)}.gif"
        sheet = labelled_sheet(model.videos, labels, cell_px, SHEET_COLUMNS, model_label(model).replace("\n", ", "))
        write_gif(sheet, path, fps, min_side=0)
        written[f"samples/{path.name}"] = path
    if result.real_videos is not None:
        sheet = labelled_sheet(result.real_videos, labels, cell_px, SHEET_COLUMNS, "real held-out clips")
        write_gif(sheet, samples / "real.gif", fps, min_side=0)
        written["samples/real.gif"] = samples / "real.gif"
    written[CHART_FILE] = write_speed_quality_chart(result, directory / CHART_FILE)

    lines = [f"{i}\t{seed}\t{clip}\t{prompt}" for i, (seed, clip, prompt) in
             enumerate(zip(result.seeds, result.clip_ids or [""] * len(result.prompts), result.prompts, strict=True))]
    (directory / "prompts.txt").write_text("index\tseed\tclip_id\tprompt\n" + "\n".join(lines) + "\n")
    written["prompts.txt"] = directory / "prompts.txt"

    data = {"format": asdict(result.format), "columns": result.columns, "untrained_metrics": result.untrained_metrics,
            "scorers": result.scorers, "notes": result.notes, "real": result.real,
            "prompts": result.prompts, "seeds": result.seeds, "clip_ids": result.clip_ids,
            "models": [{"name": m.name, "path": m.path, "role": m.role, "sampler": m.sampler, "backend": m.backend,
                        "num_steps": m.num_steps,
                        "cfg_scale": m.cfg_scale, "metrics": m.metrics, "per_video": m.per_video}
                       for m in result.models]}
    (directory / "results.json").write_text(json.dumps(_json_safe(data), indent=2))
    written["results.json"] = directory / "results.json"
    return written
