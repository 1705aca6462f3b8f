"""reelforge's causal 3D video VAE, built as the CogVideoX paper describes its own: causal 3D convolutions (time is
padded on the past only), an encoder that halves space and time in stages, a symmetric decoder and a diagonal
Gaussian latent kept near N(0, I) by a KL term. The first frame is encoded alone, so 1 + 4k frames give 1 + k latent
frames at 4x time compression, and an image (T = 1) is a one-frame video through the same weights.

Every layer is causal in time (convolutions see only past frames, group norms normalise each frame on its own), so
the latents of frame k never depend on later frames: a video can be encoded as it arrives, and images and videos
share one model."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASS_NAME = "CausalVAE"


@dataclass
class CausalVAEConfig:
    in_channels: int = 3
    latent_channels: int = 16
    block_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # one encoder stage each
    layers_per_block: int = 1  # residual blocks per stage
    time_compression: int = 4  # 1, 2 or 4: frames 1 + t*k -> 1 + k
    space_compression: int = 8  # 4 or 8 (any power of two the stages allow)
    norm_groups: int = 8
    scaling_factor: float = 1.0  # latents are multiplied by it before diffusion (1 / their std on the data)

    def problems(self) -> list[str]:
        """What is wrong with this config (empty: nothing), each naming its field."""
        problems = []
        stages = len(self.block_channels) - 1  # downsamplings: one between each pair of stages
        for name in ("time_compression", "space_compression"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                problems.append(f"{name}: expected a power of two, got {value}")
            elif int(math.log2(value)) > stages:
                problems.append(f"{name}: {value} needs {int(math.log2(value))} downsamplings, block_channels "
                                f"{self.block_channels} gives {stages}; add stages to block_channels")
        if self.latent_channels < 1 or self.layers_per_block < 1 or not self.block_channels:
            problems.append("latent_channels, layers_per_block and block_channels must be at least 1")
        bad = [c for c in self.block_channels if c < 1 or c % self.norm_groups]
        if bad:
            problems.append(f"block_channels: {bad} not a positive multiple of norm_groups {self.norm_groups}")
        return problems


# --- layers --------------------------------------------------------------------------------------------------------

class CausalConv3d(nn.Module):
    """A 3D convolution padded in time with copies of the first frame (CogVideoX's causal padding): output frame t
    sees input frames t-k+1 .. t only. Space is zero-padded on both sides as usual."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = nn.Conv3d(cin, cout, kernel, padding=(0, kernel // 2, kernel // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            past = x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)  # (B, C, T + k - 1, H, W)
        return self.conv(x)  # (B, C', T, H, W)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over each frame on its own: statistics over the whole clip would let later frames change earlier
    ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout)
        self.norm2 = FrameGroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Halve space with a stride-2 convolution per frame and/or time by averaging frame pairs after the first,
    which stays alone (1 + 2k frames -> 1 + k), as CogVideoX's downsampler does."""

    def __init__(self, channels: int, space: bool, time: bool):
        super().__init__()
        self.time = time
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if space else 1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.time and x.shape[2] > 1:
            rest = rearrange(x[:, :, 1:], "b c (t two) h w -> b c t two h w", two=2).mean(dim=3)
            x = torch.cat([x[:, :, :1], rest], dim=2)  # (B, C, 1 + (T-1)/2, H, W)
        y = self.conv(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=b)  # (B, C, T', H/2, W/2) with space


class Upsample(nn.Module):
    """The mirror of Downsample: nearest-neighbour doubling of space and/or of every frame after the first."""

    def __init__(self, channels: int, space: bool, time: bool):
        super().__init__()
        self.space, self.time = space, time
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.time and x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)  # (B, C, 1 + 2(T-1), H, W)
        y = rearrange(x, "b c t h w -> (b t) c h w")
        if self.space:
            y = F.interpolate(y, scale_factor=2.0, mode="nearest")
        return rearrange(self.conv(y), "(b t) c h w -> b c t h w", b=b)


# --- encoder and decoder -------------------------------------------------------------------------------------------

def _downsamplings(config: CausalVAEConfig) -> list[tuple[bool, bool]]:
    """(space, time) halving after each encoder stage but the last; both are done in the earliest stages."""
    n_space, n_time = int(math.log2(config.space_compression)), int(math.log2(config.time_compression))
    return [(i < n_space, i < n_time) for i in range(len(config.block_channels) - 1)]


class Encoder(nn.Module):
    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        channels, groups = config.block_channels, config.norm_groups
        self.conv_in = CausalConv3d(config.in_channels, channels[0])
        self.stages = nn.ModuleList()
        cin = channels[0]
        downs = _downsamplings(config)
        for i, cout in enumerate(channels):
            layers: list[nn.Module] = []
            for _ in range(config.layers_per_block):
                layers.append(ResBlock(cin, cout, groups))
                cin = cout
            if i < len(downs):
                layers.append(Downsample(cout, *downs[i]))
            self.stages.append(nn.Sequential(*layers))
        self.mid = nn.Sequential(ResBlock(cin, cin, groups), ResBlock(cin, cin, groups))
        self.norm_out = FrameGroupNorm(groups, cin)
        self.conv_out = CausalConv3d(cin, 2 * config.latent_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, T, H, W)
        for stage in self.stages:
            h = stage(h)
        h = self.mid(h)  # (B, C, T', H', W')
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 * latent, T', H', W')


class Decoder(nn.Module):
    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        channels, groups = config.block_channels, config.norm_groups
        cin = channels[-1]
        self.conv_in = CausalConv3d(config.latent_channels, cin)
        self.mid = nn.Sequential(ResBlock(cin, cin, groups), ResBlock(cin, cin, groups))
        self.stages = nn.ModuleList()
        downs = _downsamplings(config)
        for i in reversed(range(len(channels))):
            cout = channels[i]
            layers: list[nn.Module] = []
            for _ in range(config.layers_per_block):
                layers.append(ResBlock(cin, cout, groups))
                cin = cout
            if i > 0:  # undo the downsampling after encoder stage i - 1
                layers.append(Upsample(cout, *downs[i - 1]))
            self.stages.append(nn.Sequential(*layers))
        self.norm_out = FrameGroupNorm(groups, cin)
        self.conv_out = CausalConv3d(cin, config.in_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C, T', H', W')
        for stage in self.stages:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, T, H, W)


# --- the model -----------------------------------------------------------------------------------------------------

class CausalVAE(nn.Module):
    """encode: video (B, 3, T, H, W) in [-1, 1] -> the latent Gaussian's (mean, logvar), each (B, C, T', H', W');
    decode: latents -> video. forward(x, noise) is the training pass: a latent drawn with `noise` (the mean when
    None), its decoding, and the Gaussian for the KL term."""

    def __init__(self, config: CausalVAEConfig):
        super().__init__()
        problems = config.problems()
        if problems:
            raise ValueError(f"CausalVAEConfig: {problems[0]}")
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def time_compression(self) -> int:
        return self.config.time_compression

    @property
    def space_compression(self) -> int:
        return self.config.space_compression

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def frame_count_ok(self, num_frames: int) -> bool:
        """1 + t*k frames for time compression t (the first frame is encoded alone)."""
        return num_frames >= 1 and (num_frames - 1) % self.time_compression == 0

    def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """(B, C, T', H', W') of the latents of a video of `shape` (B, 3, T, H, W); a clear error when it cannot be
        encoded."""
        b, _, t, h, w = shape
        s = self.space_compression
        if not self.frame_count_ok(t):
            raise ValueError(f"CausalVAE: {t} frames cannot be encoded at time compression {self.time_compression}; "
                             f"use 1 + {self.time_compression}k frames (e.g. {1 + self.time_compression * 4})")
        if h % s or w % s:
            raise ValueError(f"CausalVAE: {h}x{w} frames are not divisible by the space compression {s}")
        return b, self.latent_channels, 1 + (t - 1) // self.time_compression, h // s, w // s

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.latent_shape(tuple(x.shape))
        mean, logvar = self.encoder(x).chunk(2, dim=1)  # (B, C, T', H', W') each
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # (B, 3, T, H, W)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        mean, logvar = self.encode(x)
        z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise.to(mean)
        return self.decode(z), mean, logvar

    # --- files ---

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """config.json and model.safetensors in `folder`; `state_dict` (e.g. EMA weights) instead of the module's.
        Returns the weights file."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.state_dict()
        (folder / CONFIG_FILE).write_text(json.dumps({"_class_name": CLASS_NAME, **dataclasses.asdict(self.config)},
                                                     indent=2))
        weights = folder / WEIGHTS_FILE
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(weights))
        return weights

    @classmethod
    def from_pretrained(cls, folder: str | Path, sha256: str | None = None, device: str = "cpu") -> CausalVAE:
        """The model saved by `save_pretrained` in `folder`; with `sha256`, the weights file must have it."""
        from safetensors.torch import load_file

        from models.checksum import sha256_of

        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder}: not a CausalVAE folder (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
        data = json.loads((folder / CONFIG_FILE).read_text())
        if data.pop("_class_name", None) != CLASS_NAME:
            raise ValueError(f"{folder}/{CONFIG_FILE}: not a {CLASS_NAME} config")
        if sha256 is not None:
            actual = sha256_of(folder / WEIGHTS_FILE)
            if actual != sha256:
                raise ValueError(f"{folder}/{WEIGHTS_FILE}: sha256 is {actual}, expected {sha256}")
        known = {f.name for f in dataclasses.fields(CausalVAEConfig)}
        model = cls(CausalVAEConfig(**{k: v for k, v in data.items() if k in known}))
        model.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device=device))
        return model.to(device)


# --- presets -------------------------------------------------------------------------------------------------------

PRESETS: dict[str, CausalVAEConfig] = {
    # CogVideoX's shape (4x8x8, 16 channels) at a width that trains on a GPU
    "CausalVAE-4x8x8": CausalVAEConfig(latent_channels=16, block_channels=[64, 128, 256, 256], time_compression=4,
                                       space_compression=8),
    # small enough for 2 CPU cores: 4x spatial
    "CausalVAE-T-4x4x4": CausalVAEConfig(latent_channels=8, block_channels=[16, 32, 64], time_compression=4,
                                         space_compression=4),
    "CausalVAE-T-1x4x4": CausalVAEConfig(latent_channels=8, block_channels=[16, 32, 64], time_compression=1,
                                         space_compression=4),
}


def causal_vae_config(preset: str, **overrides) -> CausalVAEConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown CausalVAE preset {preset!r}; expected one of {sorted(PRESETS)}")
    return dataclasses.replace(copy.deepcopy(PRESETS[preset]), **overrides)
