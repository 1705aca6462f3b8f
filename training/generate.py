"""Batched generation for `reelforge generate`: each video starts from the noise of its own seed, so a video depends on
its prompt and seed only, never on the other prompts of its batch (evaluation draws prompt i from seed + i alike)."""

from __future__ import annotations

import numpy as np
import torch

from training.sample import generate


def seeded_noise(seeds: list[int], channels: int, frames: int, height: int, width: int) -> torch.Tensor:
    """(B, C, T, H, W) standard normal noise, video i drawn from its own generator seeded with seeds[i]; with one seed
    it equals the noise `training.sample.generate` draws for a batch of one."""
    shape = (1, channels, frames, height, width)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generate_videos(loaded, codec, prompts: list[str], seeds: list[int], num_frames: int, height: int, width: int,
                    num_steps: int, cfg_scale: float, device: torch.device | str = "cpu",
                    negative_prompt: str = "", sampler: str = "ddim") -> np.ndarray:
    """(B, T, H, W, 3) uint8 videos of an exported model (training.export.LoadedModel) at `num_frames` x `height` x
    `width` pixels; `negative_prompt` replaces the empty prompt in classifier-free guidance; `sampler` is "ddim" or
    "dpmpp-2m"."""
    _, frames, latent_h, latent_w = codec.latent_shape(num_frames, height, width)  # causal VAEs: 1 + (n - 1) / 4
    noise = seeded_noise(seeds, loaded.model.config.in_channels, frames, latent_h, latent_w)
    negatives = [negative_prompt] * len(prompts) if negative_prompt else None
    latents = generate(loaded.model, loaded.text_encoder, loaded.schedule, list(prompts), frames, latent_h, num_steps,
                       cfg_scale, seed=int(seeds[0]), in_channels=noise.shape[1], device=device,
                       clip_x0=codec.clip_range, negative_prompts=negatives, noise=noise, sampler=sampler)
    return codec.decode(latents)
