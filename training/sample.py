"""Sampling from a trained model: the DDIM loop with classifier-free guidance, and GIF/MP4 writers for the results."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from models.guided_sampling import check_sampler, sample_guided
from models.schedules import NoiseSchedule


@torch.no_grad()
def generate(model, text_encoder, schedule: NoiseSchedule, prompts: list[str], num_frames: int, size: int,
             num_steps: int, cfg_scale: float, seed: int, in_channels: int = 3, dtype=torch.float32,
             device="cpu", clip_x0: float | None = 1.0, negative_prompts: list[str] | None = None,
             noise: torch.Tensor | None = None, sampler: str = "ddim", width: int | None = None) -> torch.Tensor:
    """Videos for `prompts`, (B, C, T, H, W) in the model's data range. Same seed, same prompts: same videos.
    `clip_x0` (default 1: pixels in [-1, 1]) clamps each step's x0 prediction; None for latents of unknown range.
    `negative_prompts` take the empty prompt's place in guidance; `noise` (B, C, T, H, W), when given, is the start
    instead of noise drawn from `seed` (per-video seeds, any H and W). `sampler`: "ddim" or "dpmpp-2m"
    (DPM-Solver++ 2M, models/dpm_solver.py). `width`: the frames' width when it is not `size` (a bucket's shape)."""
    check_sampler(sampler)
    batch = len(prompts)
    context, mask = text_encoder(prompts)
    null_context, null_mask = text_encoder(list(negative_prompts) if negative_prompts else [""] * batch)
    context, null_context = context.to(device, dtype), null_context.to(device, dtype)
    mask, null_mask = mask.to(device), null_mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    x = (noise if noise is not None else
         torch.randn((batch, in_channels, num_frames, size, width or size), generator=generator)).to(device)
    return sample_guided(model, schedule, x, context, mask, null_context, null_mask, num_steps, cfg_scale, sampler,
                         clip_x0, dtype)


def _upscale(frames: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscale of (T, H, W, 3) so tiny demo videos are visible in the MLflow UI."""
    factor = max(1, -(-min_side // min(frames.shape[1:3])))
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def tile(videos: np.ndarray, pad: int = 2) -> np.ndarray:
    """(B, T, H, W, 3) -> (T, H, B*(W+pad)-pad, 3): the prompts side by side."""
    b, t, h, w, c = videos.shape
    out = np.full((t, h, b * (w + pad) - pad, c), 255, np.uint8)
    for i in range(b):
        out[:, :, i * (w + pad):i * (w + pad) + w] = videos[i]
    return out


def write_gif(frames: np.ndarray, path: str | Path, fps: float, min_side: int = 128, comment: str = "") -> None:
    frames = _upscale(frames, min_side)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, round(1000 / fps)), loop=0,
                   **({"comment": comment} if comment else {}))


def write_mp4(frames: np.ndarray, path: str | Path, fps: float, min_side: int = 128,
              metadata: dict[str, str] | None = None) -> None:
    """`metadata`: container tags; the MP4 muxer keeps the standard keys (title, comment, description, ...)."""
    frames = _upscale(frames, min_side)
    h, w = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sides
    with av.open(str(path), "w") as container:
        container.metadata.update(metadata or {})
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:h, :w]),
                                                                   format="rgb24")))
        container.mux(stream.encode())


class SampleLogger:
    """Sample videos for the configured prompts during training, scored and logged to MLflow by rank 0. Every rank
    runs the sampler (under ZeRO-3 the forward is a collective)."""

    def __init__(self, config, text_encoder, schedule: NoiseSchedule, codec, tracker, dtype, device):
        self.config = config  # training.config.SamplingConfig
        self.text_encoder, self.schedule, self.codec = text_encoder, schedule, codec
        self.tracker, self.dtype, self.device = tracker, dtype, device

    def due(self, step: int, total_steps: int) -> bool:
        every = self.config.every_steps
        return bool(self.config.prompts) and bool(every) and step % every == 0 and step < total_steps

    def log(self, model, ema, stage, tag: str, step: int, shape: tuple[int, int, int] | None = None) -> None:
        """`shape`: the (frames, height, width) pixels to sample (a bucket's: training.buckets.sample_shape); None:
        the stage's square."""
        if not self.config.prompts:
            return
        s = self.config
        frames, height, width = shape or (stage.num_frames, stage.size, stage.size)
        model.eval()
        with ema.swapped_in():
            # the clip in the codec's space: a latent codec's frames and sides, decoded below
            channels, frames, height, width = self.codec.latent_shape(frames, height, width)
            latents = generate(model, self.text_encoder, self.schedule, s.prompts, frames, height, s.num_steps,
                               s.cfg_scale, s.seed, channels, self.dtype, self.device,
                               clip_x0=self.codec.clip_range, width=width)
        model.train()
        if self.tracker.client is not None:
            self._write(self.codec.decode(latents), stage.fps, tag, step)

    def _write(self, clips: np.ndarray, fps: float, tag: str, step: int) -> None:
        import tempfile

        from training.metrics import prompt_adherence

        scores = prompt_adherence(clips, self.config.prompts)  # 0 scored when the prompts are not the sample dump's
        if scores["num_scored"]:
            self.tracker.metrics({f"samples_{k}": float(v) for k, v in scores.items() if k != "num_scored"}, step)
        frames = tile(clips)
        with tempfile.TemporaryDirectory() as directory:
            paths = [Path(directory) / f"{tag}.gif", Path(directory) / f"{tag}.mp4", Path(directory) / "prompts.txt"]
            write_gif(frames, paths[0], fps)
            write_mp4(frames, paths[1], fps)
            paths[2].write_text("\n".join(self.config.prompts) + "\n")
            for path in paths:
                self.tracker.artifact(str(path), "samples")
