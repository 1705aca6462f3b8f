"""`reelforge generate`: videos from prompts with an exported model (a folder, or an MLflow `models:/` or `runs:/`
URI), each written as MP4 (and GIF) with its prompt, seed and model in the file's metadata and a JSON sidecar beside.

Output names are deterministic and each sidecar is written last, after its videos were renamed into place, so it is the
completion record: a rerun (of a killed run, or with more prompts) skips every prompt whose sidecar matches."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from curation.redact import redact_uri
from models.checksum import sha256_of
from pipelines.generate_batch import Job, Settings, generate_batch, load_generator

log = logging.getLogger("reelforge.generate")

VIDEO_SUFFIXES = (".mp4", ".gif")
# what a sidecar must match for its videos to count as done; other fields (timings, device) may differ
REQUEST_KEYS = ("prompt", "negative_prompt", "seed", "steps", "cfg_scale", "model_sha256", "num_frames", "width",
                "height", "fps", "min_side", "files", "sampler")
RECORDED_DEFAULTS = {"sampler": "ddim"}  # what a sidecar written before the key existed was made with


@dataclass
class GenerateConfig:
    model: str  # an exported model folder, models:/NAME/VERSION or runs:/RUN_ID/model
    out: str  # a directory, or FILE.mp4 / FILE.gif for a single prompt
    prompt: str | None = None
    prompts_file: str | None = None  # one prompt per line; blank lines are skipped; prompt i uses seed + i
    negative_prompt: str = ""
    steps: int | None = None  # None: config.json's sampling.num_steps (a student: the steps it was distilled to)
    cfg: float | None = None  # None: config.json's sampling.cfg_scale (1.0 for a guidance-distilled student)
    seed: int = 0
    num_frames: int | None = None  # None: the last curriculum stage's
    size: str | None = None  # "WxH" or "N" (square); None: the last curriculum stage's
    fps: float | None = None  # None: the last curriculum stage's
    batch: int = 4
    gif: bool = False  # also a GIF beside each MP4 (an --out ending in .gif writes the GIF alone)
    device: str = "auto"
    min_side: int = 0  # nearest-neighbour upscale so the short side is at least this (0: the generated size)
    overwrite: bool = False  # regenerate outputs whose sidecar records other settings instead of refusing
    tracking_uri: str | None = None  # for models:/ and runs:/; None: MLFLOW_TRACKING_URI
    cache_dir: str | None = None  # where downloaded models are kept; None: $REELFORGE_CACHE or ~/.cache/reelforge
    backend: str = "torch"  # "onnxruntime": the denoiser.onnx in a folder written by `reelforge export-onnx`
    sampler: str = "ddim"  # "dpmpp-2m": DPM-Solver++ (2M), e.g. a teacher in 16 steps instead of DDIM's 32
    ray: bool = False  # a Ray Data job: `ray_workers` actors, each loading the model once (--out on a shared disk)
    ray_address: str | None = None  # None: RAY_ADDRESS, a cluster started here, or a new local one
    ray_workers: int = 1
    gpus_per_worker: float = 0.0  # > 0: each worker runs on the GPU Ray gives it


# ---------------------------------------------------------------------------------------------------------------------
# Inputs: prompts, size, the model


def read_prompts(config: GenerateConfig) -> list[str]:
    if (config.prompt is None) == (config.prompts_file is None):
        raise ValueError("give exactly one of --prompt and --prompts-file")
    if config.prompt is not None:
        if not config.prompt.strip():
            raise ValueError("--prompt is empty: give the text of the video to generate")
        return [config.prompt.strip()]
    path = Path(config.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file (expected one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts (expected one prompt per line)")
    return prompts


def parse_size(size: str) -> tuple[int, int]:
    """"WxH" or "N" -> (width, height)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", size)
    if not match or int(match[1]) < 1 or int(match[2] or match[1]) < 1:
        raise ValueError(f"--size {size!r}: expected WIDTHxHEIGHT in pixels such as 32x32, or one number for a square")
    return int(match[1]), int(match[2] or match[1])


def _cache_root(config: GenerateConfig) -> Path:
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("REELFORGE_CACHE") or Path.home() / ".cache" / "reelforge")


def _pinned(uri: str) -> bool:
    """A run's artifacts and a numbered model version never change; an alias or `latest` may move."""
    return uri.startswith("runs:/") or re.fullmatch(r"models:/[^/@]+/\d+/?", uri) is not None


def resolve_model(config: GenerateConfig) -> tuple[Path, str]:
    """(local folder holding config.json, the model's id for metadata: the URI as given, or the absolute path)."""
    from training.evaluate import model_folder

    model = config.model
    if not model.startswith(("models:/", "runs:/")):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"--model {model}: no such folder (expected the model/ folder that `reelforge "
                                    "train` or `distill` exports, models:/NAME/VERSION or runs:/RUN_ID/model)")
        folder = model_folder(path)
        return folder, str(folder.resolve())
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(f"--model {model}: an MLflow URI needs --tracking-uri or MLFLOW_TRACKING_URI (the store the "
                         "model was registered in)")
    key = hashlib.sha256(f"{uri}\n{model}".encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.split(":", 1)[1]).strip("-")
    target = _cache_root(config) / "models" / f"{slug}-{key}"
    if _pinned(model) and target.is_dir():
        try:
            return model_folder(target), model
        except FileNotFoundError:
            pass  # an incomplete copy: fetch again
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        import mlflow.artifacts
        from mlflow.exceptions import MlflowException

        try:
            mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(staging), tracking_uri=uri,
                                                registry_uri=uri)
        except MlflowException as err:
            first = str(err.message).strip().splitlines()[0] if str(err.message).strip() else type(err).__name__
            raise ValueError(f"--model {model}: not found in {redact_uri(uri)} ({first})") from None
        model_folder(staging)  # an artifact without config.json is not a reelforge model: say so before caching it
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("downloaded %s from %s to %s", model, redact_uri(uri), target)
    return model_folder(target), model


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def plan_outputs(config: GenerateConfig, prompts: list[str]) -> list[Job]:
    """Deterministic file names: FILE for a single prompt, else DIR/<index>-<prompt words>-seed<seed>.mp4 (.gif)."""
    out = Path(config.out)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        if len(prompts) != 1:
            raise ValueError(f"--out {out} names one file but there are {len(prompts)} prompts: give a directory")
        files = [out] if out.suffix.lower() == ".gif" or not config.gif else [out, out.with_suffix(".gif")]
        return [Job(0, prompts[0], config.seed, files)]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a directory, or a name ending in .mp4 or .gif")
    width = max(5, len(str(len(prompts) - 1)))
    jobs = []
    for i, prompt in enumerate(prompts):
        words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48].rstrip("-") or "prompt"
        stem = out / f"{i:0{width}d}-{words}-seed{config.seed + i}"
        files = [stem.with_suffix(".mp4")] + ([stem.with_suffix(".gif")] if config.gif else [])
        jobs.append(Job(i, prompt, config.seed + i, files))
    return jobs


def _is_done(job: Job, request: dict, overwrite: bool) -> bool:
    """True when the sidecar records this request and its videos are in place; refuses to replace other settings'
    outputs unless `overwrite`."""
    if not job.sidecar.is_file() or not all(f.is_file() for f in job.files):
        return False
    try:
        recorded = json.loads(job.sidecar.read_text())
    except (OSError, ValueError):
        return False  # a torn sidecar: regenerate
    differing = [k for k in REQUEST_KEYS if recorded.get(k, RECORDED_DEFAULTS.get(k)) != request[k]]
    if not differing:
        return True
    if overwrite:
        return False
    changes = ", ".join(f"{k} {recorded.get(k)!r} -> {request[k]!r}" for k in differing)
    raise ValueError(f"{job.sidecar} records other settings ({changes}): use another --out, or --overwrite to "
                     "replace those outputs")


# ---------------------------------------------------------------------------------------------------------------------
# The workflow


def _check_flags(config: GenerateConfig) -> None:
    from models.guided_sampling import SAMPLERS

    if config.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {config.batch}")
    if config.backend not in ("torch", "onnxruntime"):
        raise ValueError(f"--backend {config.backend!r}: expected torch or onnxruntime")
    if config.sampler not in SAMPLERS:
        raise ValueError(f"--sampler {config.sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if config.ray and (config.ray_workers < 1 or config.gpus_per_worker < 0):
        raise ValueError(f"--workers {config.ray_workers}, --gpus-per-worker {config.gpus_per_worker}: expected at "
                         "least 1 worker and a GPU share of 0 or more")


def resolve_settings(config: GenerateConfig) -> Settings:
    """The flags over the model's own sampling and format, checked against its codec and patch."""
    import torch

    from models.clip_scorer import resolve_device
    from training.export import export_codec

    size = parse_size(config.size) if config.size is not None else None
    folder, model_id = resolve_model(config)
    model_config = json.loads((folder / "config.json").read_text())
    sampling = model_config.get("sampling") or {}
    stage = (model_config.get("curriculum") or [{}])[-1]
    steps = config.steps if config.steps is not None else sampling.get("num_steps")
    cfg = config.cfg if config.cfg is not None else sampling.get("cfg_scale")
    num_frames = config.num_frames if config.num_frames is not None else stage.get("num_frames")
    width, height = size if size else (stage.get("size"), stage.get("size"))
    fps = config.fps if config.fps is not None else stage.get("fps")
    missing = [flag for flag, value in (("--steps", steps), ("--cfg", cfg), ("--num-frames", num_frames),
                                        ("--size", width), ("--fps", fps)) if value is None]
    if missing:
        raise ValueError(f"{folder}/config.json does not say how to sample this model: give {' '.join(missing)}")
    steps, cfg, num_frames, width, height, fps = int(steps), float(cfg), int(num_frames), int(width), int(height), \
        float(fps)
    if config.ray:
        device = "cuda" if config.gpus_per_worker > 0 else "cpu"  # what each worker was given
    else:
        device = str(resolve_device(config.device))
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is visible here; use --device cpu or auto")
    codec = export_codec(model_config, "cpu")  # the model's own codec, from its config.json
    model_params = model_config.get("model") or {}
    patch, patch_frames = model_params.get("patch_size", 1), model_params.get("patch_frames", 1)
    side = patch * codec.space_compression
    if width % side or height % side:
        raise ValueError(f"--size {width}x{height}: width and height must be multiples of {side} (the model's patch "
                         f"of {patch} pixels)")
    latent_frames = codec.latent_shape(num_frames, height, width)[1] if codec.frame_count_ok(num_frames) else 0
    if steps < 1 or latent_frames < 1 or latent_frames % patch_frames or fps <= 0:
        raise ValueError(f"--steps {steps}, --num-frames {num_frames}, fps {fps}: expected steps >= 1, fps > 0 and a "
                         f"frame count codec {codec.id} takes whose {latent_frames} latent frames are a positive "
                         f"multiple of the model's patch_frames {patch_frames}")
    if width != height and not (model_config.get("buckets") or {}).get("aspect_ratios"):
        log.warning("the model was trained on squares (%s px); %dx%d is outside what it saw", stage.get("size"),
                    width, height)
    if config.negative_prompt and cfg == 1.0:
        log.warning("--cfg 1 (no guidance, as a guidance-distilled student is sampled): the negative prompt has no "
                    "effect; give --cfg above 1 to use it")
    onnx = config.backend == "onnxruntime"
    if onnx and not (folder / "denoiser.onnx").is_file():
        raise FileNotFoundError(f"{folder} has no denoiser.onnx: run `reelforge export-onnx --model {config.model} "
                                "--out DIR` and pass --model DIR with --backend onnxruntime")
    sha256 = sha256_of(folder / ("denoiser.onnx" if onnx else "model.safetensors"))  # the weights that run
    return Settings(str(folder), model_id, sha256, device, config.backend, config.sampler, steps, cfg, num_frames,
                    width, height, fps, config.negative_prompt, config.min_side)


def generate_here(config: GenerateConfig, settings: Settings, pending: list[Job], total: int) -> float:
    """Every pending job in this process, in batches, with progress; returns the generation seconds."""
    loaded, codec = load_generator(settings)
    batches = [pending[i:i + config.batch] for i in range(0, len(pending), config.batch)]
    seconds, done = 0.0, total - len(pending)
    for number, batch in enumerate(batches, 1):
        elapsed = generate_batch(loaded, codec, settings, batch)
        seconds += elapsed
        done += len(batch)
        eta = seconds / (done - (total - len(pending))) * (total - done)
        log.info("batch %d/%d: %d/%d videos done (%.2f s/video, about %.0f s left)", number, len(batches), done,
                 total, elapsed / len(batch), eta)
    return seconds


def run_generate(config: GenerateConfig) -> dict:
    """Generate every prompt not already done; returns the summary (files written and skipped, settings, timing)."""
    started = time.perf_counter()
    _check_flags(config)
    jobs = plan_outputs(config, read_prompts(config))
    settings = resolve_settings(config)
    pending = [job for job in jobs if not _is_done(job, settings.record(job), config.overwrite)]
    skipped = len(jobs) - len(pending)
    where = f"Ray ({config.ray_workers} workers)" if config.ray else settings.device
    log.info("%d prompts: %d already done, %d to generate with %s (%d %s steps, cfg %g, %d frames of %dx%d px) on %s",
             len(jobs), skipped, len(pending), settings.model_id, settings.steps, settings.sampler, settings.cfg,
             settings.num_frames, settings.width, settings.height, where)
    generation_seconds = 0.0
    if pending and config.ray:
        from pipelines.generate_ray import generate_on_ray

        generation_seconds = generate_on_ray(settings, pending, len(jobs), config.batch, config.ray_workers,
                                             config.gpus_per_worker, config.ray_address)
    elif pending:
        generation_seconds = generate_here(config, settings, pending, len(jobs))
    written = [str(f) for job in pending for f in job.files]
    generated = len(pending)
    return {"model": settings.model_id, "model_sha256": settings.sha256, "out": config.out, "prompts": len(jobs),
            "generated": generated, "skipped": skipped, "files": written, "sampler": settings.sampler,
            "steps": settings.steps, "cfg_scale": settings.cfg, "num_frames": settings.num_frames,
            "width": settings.width, "height": settings.height, "fps": settings.fps, "device": where,
            "backend": config.backend,
            "seconds_per_video": generation_seconds / generated if generated else 0.0,
            "wall_seconds": time.perf_counter() - started}


def summary_text(summary: dict) -> str:
    lines = [
        f"model: {redact_uri(summary['model'])} (model.safetensors sha256 {summary['model_sha256'][:12]})",
        f"sampling: {summary['steps']} {summary.get('sampler', 'ddim')} steps, cfg {summary['cfg_scale']:g}; "
        f"{summary['num_frames']} frames of "
        f"{summary['width']}x{summary['height']} px at {summary['fps']:g} fps on {summary['device']}",
        f"videos: {summary['generated']} generated, {summary['skipped']} already done (of {summary['prompts']} "
        f"prompts); {summary['seconds_per_video']:.2f} s per video, {summary['wall_seconds']:.1f} s in all",
        f"outputs: {summary['out']} (a .json sidecar beside each video records its prompt, seed and settings)",
    ]
    return "\n".join(lines)
