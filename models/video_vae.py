"""Video VAEs behind the codec interface of models/codec.py: pretrained ones through diffusers' own classes, and
reelforge's own causal VAE (models/causal_vae.py).

Loading is what a user does: a Hugging Face hub id pinned to a revision, or a local folder; the (sub)folder's files are
hashed before the weights are read, checked against `codec.sha256` when given, and the hashes go into the codec's id.
Latents are normalised as each VAE's own pipeline does (Wan: per-channel mean and std; LTX: per-channel mean and std
times scaling_factor; CogVideoX and HunyuanVideo: scaling_factor), so the model sees roughly unit-variance latents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from models.checksum import sha256_of
from models.codec import DTYPES, VAE_CLASSES, CodecConfig, frames_to_unit, unit_to_frames

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


# ---------------------------------------------------------------- loading: folder, hashes, device


def resolve_folder(config: CodecConfig) -> Path:
    """The local folder holding the VAE's config and weights: `model` itself (plus `subfolder`) when it is a folder,
    else a snapshot of the hub repo at the pinned revision (only the subfolder's config and safetensors)."""
    if not config.model:
        raise ValueError(f"codec.model: required for codec.kind {config.kind!r} (a hub id or a local folder)")
    local = Path(config.model).expanduser()
    if local.is_dir():
        folder = local / config.subfolder if config.subfolder else local
        if not folder.is_dir():
            raise ValueError(f"codec.subfolder: {config.subfolder!r} is not a folder inside {local}")
        return folder
    if not HUB_ID.fullmatch(config.model):
        raise ValueError(f"codec.model: {config.model!r} is neither a local folder nor a hub id (org/name)")
    if not config.revision:
        raise ValueError(f"codec.revision: the hub id {config.model} needs a pinned revision (best a commit sha), "
                         f"e.g. --set codec.revision=<sha>")
    return _snapshot(config)


def _snapshot(config: CodecConfig) -> Path:
    from huggingface_hub import snapshot_download

    prefix = f"{config.subfolder.strip('/')}/" if config.subfolder else ""
    try:
        root = snapshot_download(config.model, revision=config.revision,
                                 allow_patterns=[f"{prefix}config.json", f"{prefix}*.safetensors"])
    except Exception as err:  # network, auth, unknown revision: one line naming what was asked for
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ValueError(f"codec.model: could not fetch {config.model}@{config.revision}: "
                         f"{type(err).__name__}: {first}") from err
    return Path(root) / config.subfolder if config.subfolder else Path(root)


def hash_files(folder: Path, expected: dict[str, str]) -> dict[str, str]:
    """sha256 of every file directly in `folder`; with `expected`, each named file must match and every weights
    file must be named (an unpinned weights file is as good as no pin)."""
    files = {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}
    for name, want in expected.items():
        if name not in files:
            raise ValueError(f"codec.sha256: {name} is not in {folder} (found {sorted(files)})")
        if files[name] != want.lower():
            raise ValueError(f"codec.sha256: {name} in {folder} has sha256 {files[name]}, expected {want}")
    if expected:
        unpinned = [name for name in files if name.endswith(WEIGHT_SUFFIXES) and name not in expected]
        if unpinned:
            raise ValueError(f"codec.sha256: weights file {unpinned[0]} in {folder} has no sha256 in the map; "
                             f"add it (sha256sum {folder / unpinned[0]})")
    return files


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"codec.device: {name!r} is not a torch device (cpu, cuda, cuda:1, auto)") from err


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"codec.dtype: expected one of {list(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def _plain_config(model_config) -> dict:
    """A model's config as JSON-able data, without the keys that say where or by which version it was loaded."""
    if dataclasses.is_dataclass(model_config):
        model_config = dataclasses.asdict(model_config)
    data = json.loads(json.dumps(dict(model_config or {}), default=str))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _display_name(config: CodecConfig) -> str:
    """The model's name in an id: the hub id, or a local folder's name (the id follows content, not location)."""
    local = Path(config.model).expanduser()
    name = local.name if local.is_dir() else config.model
    return f"{name}/{config.subfolder.strip('/')}" if config.subfolder else name


# ---------------------------------------------------------------- the shared codec


class LatentCodec:
    """A VAE codec: uint8 pixels in, normalised latents out and back. Subclasses load the VAE and give its raw
    `_encode_raw(x) -> (mean, logvar)` and `_decode_raw(z) -> x` on (B, C, T, H, W) tensors in [-1, 1]."""

    clip_range: float | None = None  # latents are not clamped by samplers

    def __init__(self, config: CodecConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype)
        if config.tile_size is not None and config.tile_size < 1:
            raise ValueError(f"codec.tile_size: expected a positive number of pixels or null, got {config.tile_size}")
        self.folder = resolve_folder(config)
        self.weights_sha256 = hash_files(self.folder, config.sha256)
        # set by subclasses once the VAE is loaded
        self.channels = self.time_compression = self.space_compression = 0
        self.frame_step = 0  # clips take 1 + frame_step * k frames (the time compression, or more: CogVideoX)
        self.shift = torch.zeros(0)  # (C,) subtracted from raw latents
        self.scale = torch.ones(0)  # (C,) multiplied after the shift
        self.model_config: dict = {}
        self.kind_label = config.kind

    # -- geometry
    def frame_count_ok(self, num_frames: int) -> bool:
        return num_frames >= 1 and (num_frames - 1) % self.frame_step == 0

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        self._check_geometry(frames, height, width)
        return (self.channels, (frames - 1) // self.time_compression + 1, height // self.space_compression,
                width // self.space_compression)

    def _check_geometry(self, frames: int, height: int, width: int) -> None:
        if not self.frame_count_ok(frames):
            step = self.frame_step
            k = max(0, (frames - 1) // step)
            raise ValueError(f"codec {self.id}: {frames} frames do not fit; it takes 1 + {step}k frames, e.g. "
                             f"{1 + step * k} or {1 + step * (k + 1)}")
        if height % self.space_compression or width % self.space_compression:
            raise ValueError(f"codec {self.id}: frame size {height}x{width} is not divisible by the spatial "
                             f"compression {self.space_compression}")

    # -- encode / decode
    @torch.no_grad()
    def encode_distribution(self, video_uint8) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H, W, 3) uint8 -> normalised (mean, logvar), each (B, C, T', H', W') float32 on the codec's
        device."""
        video = torch.as_tensor(video_uint8)
        if video.ndim != 5 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise ValueError(f"codec {self.id}: expected uint8 video (B, T, H, W, 3), got {video.dtype} "
                             f"{tuple(video.shape)}")
        self._check_geometry(video.shape[1], video.shape[2], video.shape[3])
        x = frames_to_unit(video).to(self.device, self.dtype)  # (B, 3, T, H, W)
        mean, logvar = self._encode_raw(x)  # (B, C, T', H', W')
        shift, scale = self._affine(mean.ndim)
        mean = (mean.float() - shift) * scale
        logvar = logvar.float() + 2 * torch.log(scale)
        return mean, logvar

    def encode(self, video_uint8) -> torch.Tensor:
        """(B, T, H, W, 3) uint8 -> (B, C, T', H', W'): the normalised mean of the latent distribution."""
        return self.encode_distribution(video_uint8)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, T', H', W') normalised latents -> (B, T, H, W, 3) uint8."""
        if latents.ndim != 5 or latents.shape[1] != self.channels:
            raise ValueError(f"codec {self.id}: expected latents (B, {self.channels}, T', H', W'), got "
                             f"{tuple(latents.shape)}")
        shift, scale = self._affine(latents.ndim)
        z = latents.to(self.device).float() / scale + shift
        return unit_to_frames(self._decode_raw(z.to(self.dtype)))

    def _affine(self, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        view = (1, -1) + (1,) * (ndim - 2)
        return self.shift.to(self.device).view(view), self.scale.to(self.device).view(view)

    # -- identity
    @property
    def id(self) -> str:
        revision = self.config.revision or "local"
        return f"{self.kind_label}:{_display_name(self.config)}@{revision}:{self._digest()[:12]}"

    def _digest(self) -> str:
        data = {"kind": self.kind_label, "model_config": self.model_config, "weights": self.weights_sha256}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def describe(self) -> dict:
        """What to record beside anything made with this codec (a latent cache, a checkpoint, an export)."""
        config = dataclasses.asdict(self.config)
        config.pop("device")  # where it ran is not what it is
        return {"id": self.id, "kind": self.config.kind, "config": config, "model_config": self.model_config,
                "weights_sha256": dict(self.weights_sha256), "sha256": self._digest(),
                "latent": {"channels": self.channels, "time_compression": self.time_compression,
                           "space_compression": self.space_compression, "shift": self.shift.tolist(),
                           "scale": self.scale.tolist()}}

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------- diffusers' VAEs


class DiffusersVideoVAECodec(LatentCodec):
    """A pretrained video VAE through its diffusers class (AutoencoderKLWan, AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo)."""

    def __init__(self, config: CodecConfig):
        if config.vae_class not in VAE_CLASSES:
            raise ValueError(f"codec.vae_class: expected one of {list(VAE_CLASSES)}, got {config.vae_class!r}")
        super().__init__(config)
        self.kind_label = f"diffusers:{config.vae_class}"
        self.vae = self._load()
        self.model_config = _plain_config(self.vae.config)
        self.channels, self.time_compression, self.space_compression = self._geometry()
        # CogVideoX decodes latent frames in pairs after the first three: only an odd latent count (1 + 8k frames)
        # decodes back to the frames it came from (4 latents -> 16 frames, not 13)
        cogvideox = config.vae_class == "AutoencoderKLCogVideoX"
        self.frame_step = 2 * self.time_compression if cogvideox else self.time_compression
        self.shift, self.scale = self._normalisation()
        if config.slicing:
            self.vae.enable_slicing()
        if config.tiling:
            self._enable_tiling()

    def _load(self):
        import diffusers

        config_file = self.folder / "config.json"
        saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if saved.get("_class_name") not in (None, self.config.vae_class):
            raise ValueError(f"codec.vae_class: {self.folder} holds a {saved['_class_name']}, not a "
                             f"{self.config.vae_class}")
        cls = getattr(diffusers, self.config.vae_class)
        vae = cls.from_pretrained(str(self.folder), torch_dtype=self.dtype)
        return vae.to(self.device).eval().requires_grad_(False)

    def _geometry(self) -> tuple[int, int, int]:
        """(latent channels, time compression, space compression) as each class's pipeline computes them."""
        vae, name = self.vae, self.config.vae_class
        if name == "AutoencoderKLWan":
            return vae.config.z_dim, vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
        if name == "AutoencoderKLCogVideoX":
            space = 2 ** (len(vae.config.block_out_channels) - 1)
            return vae.config.latent_channels, int(vae.config.temporal_compression_ratio), space
        return vae.config.latent_channels, vae.temporal_compression_ratio, vae.spatial_compression_ratio

    def _normalisation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) per channel so that normalised = (raw - shift) * scale, as the class's pipeline does."""
        vae, name, c = self.vae, self.config.vae_class, self.channels
        if name == "AutoencoderKLWan":  # WanPipeline: (z - latents_mean) / latents_std
            mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32)
            return mean, 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32)
        if name == "AutoencoderKLLTXVideo":  # LTXPipeline: (z - latents_mean) * scaling_factor / latents_std
            mean, std = vae.latents_mean.detach().float().cpu(), vae.latents_std.detach().float().cpu()
            return mean, vae.config.scaling_factor / std
        # CogVideoX and HunyuanVideo pipelines: z * scaling_factor
        return torch.zeros(c), torch.full((c,), float(vae.config.scaling_factor))

    def _enable_tiling(self) -> None:
        tile = self.config.tile_size
        if tile is None:
            self.vae.enable_tiling()
            return
        if tile % self.space_compression:
            raise ValueError(f"codec.tile_size: {tile} is not a multiple of the spatial compression "
                             f"{self.space_compression}")
        stride = max(self.space_compression, tile * 3 // 4 // self.space_compression * self.space_compression)
        if self.config.vae_class == "AutoencoderKLCogVideoX":  # its "overlap factor" sets the stride: tile * (1 - f)
            overlap = 1 - stride / tile
            self.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                                   tile_overlap_factor_height=overlap, tile_overlap_factor_width=overlap)
            return
        self.vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                               tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return posterior.mean, posterior.logvar

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        if self.config.vae_class == "AutoencoderKLLTXVideo" and self.vae.config.timestep_conditioning:
            temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)  # LTXPipeline's decode_timestep=0
            return self.vae.decode(z, temb=temb, return_dict=False)[0]
        return self.vae.decode(z, return_dict=False)[0]


# ---------------------------------------------------------------- reelforge's own VAE


class ReelforgeVAECodec(LatentCodec):
    """reelforge's causal 3D VAE (models/causal_vae.py) from a folder saved by CausalVAE.save_pretrained; normalised
    latents are mean * scaling_factor."""

    def __init__(self, config: CodecConfig):
        if config.tiling:
            raise ValueError("codec.tiling: not supported for codec.kind reelforge-vae; set codec.tiling=false")
        if config.model and not Path(config.model).expanduser().is_dir():
            raise ValueError(f"codec.model: {config.model!r} is not a folder (kind reelforge-vae takes a folder "
                             f"saved by `reelforge train-vae`)")
        super().__init__(config)
        from models.causal_vae import CausalVAE

        self.vae = CausalVAE.from_pretrained(self.folder).to(self.device, self.dtype).eval().requires_grad_(False)
        self.model_config = _plain_config(getattr(self.vae, "config", {}))
        self.channels = int(self.vae.latent_channels)
        self.time_compression = int(self.vae.time_compression)
        self.space_compression = int(self.vae.space_compression)
        self.frame_step = self.time_compression
        factor = float(self.vae.scaling_factor)
        if not math.isfinite(factor) or factor <= 0:
            raise ValueError(f"codec.model: {self.folder} has scaling_factor {factor}; expected a positive number")
        self.shift, self.scale = torch.zeros(self.channels), torch.full((self.channels,), factor)

    def _encode_raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pieces = x.split(1) if self.config.slicing else [x]
        outs = [self.vae.encode(piece) for piece in pieces]
        return torch.cat([m for m, _ in outs]), torch.cat([v for _, v in outs])

    def _decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        pieces = z.split(1) if self.config.slicing else [z]
        return torch.cat([self.vae.decode(piece) for piece in pieces])
