"""Codecs: what stands between the pixels a dataset gives and what the diffusion model denoises.

A codec encodes uint8 videos (B, T, H, W, 3) to the model's space (B, C, T', H', W') and decodes back. Training,
sampling, the latent cache and export only talk to this interface, so a video autoencoder slots in without touching
the loop. Three kinds:

- "pixels": the identity on RGB scaled to [-1, 1] (PixelCodec, below);
- "diffusers": a pretrained video VAE through diffusers' own class (models/video_vae.py: DiffusersVideoVAECodec);
- "reelforge-vae": reelforge's own causal 3D VAE, a folder saved by models/causal_vae.CausalVAE (ReelforgeVAECodec).

Every codec has `channels`, `time_compression`, `space_compression`, `clip_range` (what samplers clamp x0 to, None for
latents), `frame_count_ok(n)`, `latent_shape(frames, h, w)`, `encode` (the latent distribution's mean),
`encode_distribution` (mean and log-variance; training samples from it with `sample_latents`), `decode` (uint8
numpy), `id` (a string naming kind, model, revision and a short sha256 of config and weights) and `describe()` (a
dict recorded beside anything made with the codec). Latent codecs normalise inside: the model sees latents shifted and
scaled as the VAE's own pipelines do, and decode undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

CODEC_KINDS = ("pixels", "diffusers", "reelforge-vae")
VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX", "AutoencoderKLHunyuanVideo", "AutoencoderKLLTXVideo")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CodecConfig:
    kind: str = "pixels"  # "pixels": the model denoises RGB in [-1, 1]; "diffusers" | "reelforge-vae": latents
    model: str = ""  # a Hugging Face hub id ("org/name", needs `revision`) or a local folder
    revision: str = ""  # the hub revision to pin, best a commit sha; unused for a local folder
    subfolder: str = ""  # where the VAE sits inside `model`, e.g. "vae" in a full pipeline repo
    vae_class: str = ""  # kind "diffusers": one of VAE_CLASSES
    sha256: dict[str, str] = field(default_factory=dict)  # file name in the (sub)folder -> sha256, checked on load
    tiling: bool = False  # encode/decode in overlapping spatial tiles (memory for large frames)
    tile_size: int | None = None  # tiles' side in pixels when tiling; None: the class's default
    slicing: bool = False  # encode/decode one video of a batch at a time
    dtype: str = "float32"  # the VAE's weights and compute: float32 | float16 | bfloat16
    device: str = "cpu"  # where the VAE runs: "cpu", "cuda", "cuda:1", or "auto" (cuda when there is one)


class Codec(Protocol):
    channels: int
    time_compression: int
    space_compression: int
    clip_range: float | None

    @property
    def id(self) -> str: ...

    def frame_count_ok(self, num_frames: int) -> bool: ...

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...

    def encode(self, video_uint8) -> torch.Tensor: ...

    def encode_distribution(self, video_uint8) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, latents: torch.Tensor) -> np.ndarray: ...

    def describe(self) -> dict: ...


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw from the diagonal Gaussian (mean, logvar) an encoder gave; logvar -inf (PixelCodec) gives the mean."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * noise


def frames_to_unit(video_uint8) -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]."""
    video = torch.as_tensor(video_uint8).float().div_(127.5).sub_(1.0)
    return video.permute(0, 4, 1, 2, 3).contiguous()


def unit_to_frames(video: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
    video = (video.float().clamp(-1, 1) + 1) * 127.5
    return video.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


class PixelCodec:
    """The identity codec: RGB scaled to [-1, 1], no compression in time or space."""

    channels = 3
    time_compression = 1
    space_compression = 1
    clip_range: float | None = 1.0  # samplers clamp x0 predictions to [-1, 1]

    def __init__(self, config: CodecConfig | None = None):
        self.config = config or CodecConfig()

    @property
    def id(self) -> str:
        return "pixels"

    def frame_count_ok(self, num_frames: int) -> bool:
        return num_frames >= 1

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.channels, frames, height, width)

    def encode(self, video_uint8) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]."""
        return frames_to_unit(video_uint8)

    def encode_distribution(self, video_uint8) -> tuple[torch.Tensor, torch.Tensor]:
        """A point mass: the pixels themselves and log-variance -inf, so sample_latents returns them exactly."""
        mean = self.encode(video_uint8)
        return mean, torch.full_like(mean, float("-inf"))

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
        return unit_to_frames(latents)

    def describe(self) -> dict:
        return {"id": self.id, "kind": "pixels", "config": {"kind": "pixels"}, "weights_sha256": {}}


def build_codec(config: CodecConfig) -> Codec:
    """The codec a config names; a wrong config raises ValueError with one line naming the key."""
    if config.kind not in CODEC_KINDS:
        raise ValueError(f"codec.kind: expected one of {list(CODEC_KINDS)}, got {config.kind!r}")
    if config.kind == "pixels":
        return PixelCodec(config)
    from models.video_vae import DiffusersVideoVAECodec, ReelforgeVAECodec

    if config.kind == "diffusers":
        return DiffusersVideoVAECodec(config)
    return ReelforgeVAECodec(config)
