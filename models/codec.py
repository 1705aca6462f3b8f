"""Codecs: what stands between the pixels a dataset gives and what the diffusion model denoises.

A codec encodes uint8 videos (B, T, H, W, 3) to the model's space (B, C, T', H', W') and decodes back. Training,
sampling and export only talk to this interface, so a video autoencoder (the latent-video work) slots in here without
touching the loop. Today there is one codec: the identity on pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CODEC_KINDS = ("pixels",)


@dataclass
class CodecConfig:
    kind: str = "pixels"  # "pixels": the model denoises RGB in [-1, 1]


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

    def encode(self, video_uint8) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, 3, T, H, W) float in [-1, 1]."""
        video = torch.as_tensor(video_uint8).float().div_(127.5).sub_(1.0)
        return video.permute(0, 4, 1, 2, 3).contiguous()

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
        video = (latents.float().clamp(-1, 1) + 1) * 127.5
        return video.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()


def build_codec(config: CodecConfig) -> PixelCodec:
    if config.kind not in CODEC_KINDS:
        raise ValueError(f"codec.kind: expected one of {list(CODEC_KINDS)}, got {config.kind!r}")
    return PixelCodec(config)
