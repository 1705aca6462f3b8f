"""One batch of `reelforge generate`: the resolved settings every video is made with, a prompt's job (its output
files), loading the model with its codec, and generating and writing a batch. Both the local loop
(pipelines/generate.py) and the Ray Data actors (pipelines/generate_ray.py) run batches through here."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Job:
    """One prompt's outputs."""

    index: int
    prompt: str
    seed: int
    files: list[Path] = field(default_factory=list)

    @property
    def sidecar(self) -> Path:
        return self.files[0].with_suffix(".json")


@dataclass
class Settings:
    """What every video of one `generate` call is made with, resolved once from the flags and the model's config.json
    (picklable: Ray workers receive it)."""

    folder: str  # the local model folder
    model_id: str  # the model as given (a URI) or its absolute path: in each file's metadata
    sha256: str  # of the weights that run
    device: str
    backend: str
    sampler: str
    steps: int
    cfg: float
    num_frames: int
    width: int
    height: int
    fps: float
    negative_prompt: str
    min_side: int

    def record(self, job: Job) -> dict:
        """The request a sidecar records for `job` (REQUEST_KEYS and the settings beside them)."""
        return {"negative_prompt": self.negative_prompt, "sampler": self.sampler, "steps": self.steps,
                "cfg_scale": self.cfg, "model": self.model_id, "model_sha256": self.sha256,
                "num_frames": self.num_frames, "width": self.width, "height": self.height, "fps": self.fps,
                "seconds": self.num_frames / self.fps, "min_side": self.min_side, "backend": self.backend,
                "prompt": job.prompt, "seed": job.seed, "files": [f.name for f in job.files]}


def load_generator(settings: Settings):
    """The exported model (or its ONNX denoiser) with its codec on the settings' device."""
    from training.export import export_codec, load_model
    from training.onnx_export import load_onnx_model

    folder = Path(settings.folder)
    onnx = settings.backend == "onnxruntime"
    loaded = load_onnx_model(folder, settings.device) if onnx else load_model(folder, settings.device)
    codec = loaded.codec or export_codec(loaded.config, settings.device)
    if loaded.model.config.in_channels != codec.channels:
        raise ValueError(f"{folder}: the model denoises {loaded.model.config.in_channels} channels but its codec "
                         f"{codec.id!r} has {codec.channels}")
    return loaded, codec


def generate_batch(loaded, codec, settings: Settings, batch: list[Job]) -> float:
    """Generate and write one batch of jobs; returns the generation's seconds (writing not counted)."""
    from training.generate import generate_videos

    tick = time.perf_counter()
    videos = generate_videos(loaded, codec, [j.prompt for j in batch], [j.seed for j in batch], settings.num_frames,
                             settings.height, settings.width, settings.steps, settings.cfg, settings.device,
                             settings.negative_prompt, settings.sampler)
    elapsed = time.perf_counter() - tick
    for job, frames in zip(batch, videos, strict=True):
        write_job(job, frames, {**settings.record(job), "generation_seconds": elapsed / len(batch),
                             "device": settings.device, "batch_size": len(batch)}, settings.min_side)
    return elapsed


def write_job(job: Job, frames, record: dict, min_side: int) -> None:
    """Each video to a temporary name then renamed; the sidecar last, so it marks the whole job done."""
    from training.sample import write_gif, write_mp4

    comment = json.dumps({k: record[k] for k in ("seed", "negative_prompt", "sampler", "steps", "cfg_scale", "model",
                                                 "model_sha256")}, sort_keys=True)
    for path in job.files:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.stem}.partial{path.suffix}")
        if path.suffix.lower() == ".gif":
            write_gif(frames, partial, record["fps"], min_side=min_side, comment=f"{record['prompt']}\n{comment}")
        else:
            write_mp4(frames, partial, record["fps"], min_side=min_side,
                      metadata={"title": record["prompt"], "comment": comment,
                                "description": f"reelforge generate: {record['model']}"})
        os.replace(partial, path)
    partial = job.sidecar.with_name(f".{job.sidecar.name}.partial")
    partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(partial, job.sidecar)
