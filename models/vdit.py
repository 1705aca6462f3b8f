"""A video diffusion transformer: DiT with adaLN-Zero, factorised space/time self-attention and text cross-attention.

Blocks follow DiT (Peebles & Xie 2023) for the conditioning, Latte / Open-Sora's STDiT for the spatial-then-temporal
attention, and PixArt-alpha for the cross-attention to text tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class VDiTConfig:
    in_channels: int = 3  # whatever the model denoises: pixels now, VAE latents later
    patch_size: int = 2  # spatial patch
    patch_frames: int = 1  # temporal patch
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    context_dim: int = 64  # width of the text tokens fed to cross-attention (the text encoder's width)
    grad_checkpointing: bool = False


# ---------------------------------------------------------------------------------------------------------------------
# Embedders


class PatchEmbed3D(nn.Module):
    """Non-overlapping (patch_frames, patch_size, patch_size) patches, linearly embedded."""

    def __init__(self, in_channels: int, hidden_size: int, patch_frames: int, patch_size: int):
        super().__init__()
        kernel = (patch_frames, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, T', H', W')
        return rearrange(x, "b d t h w -> b (t h w) d")  # (B, N, D), N = T'H'W'


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Transformer sin-cos embedding of positions (L,) -> (L, dim), as DiT's get_1d_sincos_pos_embed_from_grid."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, dim)


def sincos_3d(dim: int, frames: int, height: int, width: int) -> torch.Tensor:
    """Fixed positional embedding of a (T', H', W') token grid -> (1, T'H'W', dim), float64.

    Spatial part as DiT (half the channels encode the row, half the column); the temporal part is a 1D embedding over
    all channels added on top, as in Latte. Computed for any grid, so one model trains on a resolution curriculum.
    """
    emb_h = sincos_1d(dim // 2, torch.arange(height))  # (H', D/2)
    emb_w = sincos_1d(dim // 2, torch.arange(width))  # (W', D/2)
    spatial = torch.cat(
        [emb_h[:, None].expand(height, width, -1), emb_w[None].expand(height, width, -1)], dim=-1
    )  # (H', W', D)
    temporal = sincos_1d(dim, torch.arange(frames))  # (T', D)
    pos = temporal[:, None, None] + spatial[None]  # (T', H', W', D)
    return rearrange(pos, "t h w d -> 1 (t h w) d")  # (1, N, D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer or real) timestep, then an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.sinusoidal(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)  # (B, D)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---------------------------------------------------------------------------------------------------------------------
# Blocks


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# The flash and cuDNN attention kernels put the batch on a CUDA grid dimension limited to 65,535 blocks: temporal
# attention over B x H' x W' sequences (65,536 for 16 frames of 128 px at micro-batch 16) fails there with "invalid
# argument" or "mha_graph.execute". Each sequence attends only to itself, so splitting the batch changes no result.
MAX_ATTENTION_BATCH = 32768


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, max_batch: int) -> torch.Tensor:
    """F.scaled_dot_product_attention of (B, heads, N, Dh) tensors, at most max_batch sequences per kernel call."""
    if q.shape[0] <= max_batch:
        return F.scaled_dot_product_attention(q, k, v)
    chunks = zip(q.split(max_batch), k.split(max_batch), v.split(max_batch), strict=True)
    return torch.cat([F.scaled_dot_product_attention(*qkv) for qkv in chunks])


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # (B, N, 3D)
        qkv = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)  # 3x(B, heads, N, Dh)
        x = chunked_sdpa(qkv[0], qkv[1], qkv[2], MAX_ATTENTION_BATCH)  # (B, heads, N, Dh)
        x = rearrange(x, "b h n d -> b n (h d)")  # (B, N, D)
        return self.proj(x)


class CrossAttention(nn.Module):
    """Video tokens attend to text tokens; padded text tokens are masked out of the keys.

    Its attention batch is the clip batch B, far below MAX_ATTENTION_BATCH, so it calls the kernel unsplit.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)  # (B, heads, N, Dh)
        kv = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.num_heads)  # 2x(B,heads,L,Dh)
        mask = rearrange(context_mask, "b l -> b 1 1 l")  # (B, 1, 1, L): same keys for every head and query
        x = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask)  # (B, heads, N, Dh)
        x = rearrange(x, "b h n d -> b n (h d)")  # (B, N, D)
        return self.proj(x)


class VDiTBlock(nn.Module):
    """Spatial self-attention, temporal self-attention, cross-attention to text, MLP; adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_spatial = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn_spatial = SelfAttention(hidden_size, num_heads)
        self.norm_temporal = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn_temporal = SelfAttention(hidden_size, num_heads)
        # cross-attention is not modulated (PixArt-alpha), so its norm keeps its own affine parameters
        self.norm_cross = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm_mlp = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        # shift, scale, gate for each of spatial attention, temporal attention and MLP
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor, frames: int
    ) -> torch.Tensor:
        # x: (B, N, D) tokens in (t h w) order; c: (B, D) conditioning; context: (B, L, D) projected text tokens
        modulation = self.adaLN_modulation(c).chunk(9, dim=1)  # 9 x (B, D)
        shift_s, scale_s, gate_s, shift_t, scale_t, gate_t, shift_m, scale_m, gate_m = modulation

        h = modulate(self.norm_spatial(x), shift_s, scale_s)
        h = rearrange(h, "b (t s) d -> (b t) s d", t=frames)  # (B*T', H'W', D): each frame on its own
        h = rearrange(self.attn_spatial(h), "(b t) s d -> b (t s) d", t=frames)  # (B, N, D)
        x = x + gate_s.unsqueeze(1) * h

        h = modulate(self.norm_temporal(x), shift_t, scale_t)
        h = rearrange(h, "b (t s) d -> (b s) t d", t=frames)  # (B*H'W', T', D): each location over time
        h = rearrange(self.attn_temporal(h), "(b s) t d -> b (t s) d", b=x.shape[0])  # (B, N, D)
        x = x + gate_t.unsqueeze(1) * h

        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm_mlp(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_volume: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_volume * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, pt*ph*pw*C)


# ---------------------------------------------------------------------------------------------------------------------
# Model


class VDiT(nn.Module):
    """Denoiser for videos (B, C, T, H, W) conditioned on a timestep and text tokens; output has the input's shape."""

    def __init__(self, config: VDiTConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size={config.hidden_size} must be divisible by num_heads={config.num_heads}")
        if config.hidden_size % 4:
            # the spatial sin-cos embedding gives half the channels to rows, half to columns, each half sin and cos
            raise ValueError(f"hidden_size={config.hidden_size} must be divisible by 4")
        self.config = config
        hidden = config.hidden_size
        self.x_embedder = PatchEmbed3D(config.in_channels, hidden, config.patch_frames, config.patch_size)
        self.t_embedder = TimestepEmbedder(hidden)
        self.context_embedder = Mlp(config.context_dim, hidden, hidden)  # text tokens -> keys/values of cross-attn
        # the pooled prompt joins the timestep in c, so every adaLN modulation also sees the text
        self.pooled_text_embedder = nn.Sequential(
            nn.Linear(config.context_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.blocks = nn.ModuleList(
            [VDiTBlock(hidden, config.num_heads, config.mlp_ratio) for _ in range(config.depth)]
        )
        patch_volume = config.patch_frames * config.patch_size**2
        self.final_layer = FinalLayer(hidden, patch_volume, config.in_channels)
        self._pos_embed_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)

        # patch embedding initialised like the nn.Linear it is (DiT)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)  # DiT
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # The text embedders keep the Xavier init of _basic_init. PixArt-alpha's std=0.02 makes the cross-attention
        # keys and values about 0.02 for unit-scale text features: attention stays uniform and the text reaches the
        # output only through a small average, so a word that only moves the content (left/right) was ignored.
        # With Xavier such a word is learned in 600 steps (tests/test_models.py) and the demo learns colour faster.

        for block in self.blocks:
            # adaLN-Zero: all gates (and shifts/scales) start at 0, so every residual branch is off and each block
            # starts as the identity, which DiT found to train best
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # cross-attention has no adaLN gate: zero its output projection for the same identity start (PixArt-alpha)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

        # zero output layer: the untrained model predicts 0, the mean of both eps and v targets, so the first
        # steps do not fight large random outputs (DiT)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile each block in place (nn.Module.compile): the blocks share one graph, so compiling costs one
        block rather than the whole depth, and state_dict keys stay those of the uncompiled model."""
        for block in self.blocks:
            block.compile(**kwargs)

    def _token_grid(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> tuple[int, int, int]:
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, C={cfg.in_channels}, T, H, W), got shape {tuple(x.shape)}")
        _, _, frames, height, width = x.shape
        if frames % cfg.patch_frames or height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"x of shape {tuple(x.shape)}: T={frames} must be divisible by patch_frames={cfg.patch_frames} "
                f"and H={height}, W={width} by patch_size={cfg.patch_size}"
            )
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(
                f"context must be (B={x.shape[0]}, L, context_dim={cfg.context_dim}), got shape {tuple(context.shape)}"
            )
        if context_mask is not None and tuple(context_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"context_mask must be (B, L) = {tuple(context.shape[:2])}, got shape {tuple(context_mask.shape)}"
            )
        return frames // cfg.patch_frames, height // cfg.patch_size, width // cfg.patch_size

    def _pos_embed(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (grid, device, dtype)
        if key not in self._pos_embed_cache:
            self._pos_embed_cache[key] = sincos_3d(self.config.hidden_size, *grid).to(device=device, dtype=dtype)
        return self._pos_embed_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, C, T, H, W); t: (B,) timesteps; context: (B, L, context_dim); context_mask: (B, L), True = real.

        Returns the prediction (eps or v, whatever the model is trained on) with the shape of x, in the weights' dtype.
        """
        grid = self._token_grid(x, context, context_mask)
        batch = x.shape[0]
        # inputs follow the weights' dtype, so float32 batches work with bf16 weights (DeepSpeed bf16)
        dtype = self.x_embedder.proj.weight.dtype
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        context_mask = context_mask.to(torch.bool)
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(batch)  # (B,); a scalar t is shared

        x = self.x_embedder(x.to(dtype)) + self._pos_embed(grid, x.device, dtype)  # (B, N, D)

        context = context.to(dtype)
        real = context_mask.unsqueeze(-1).to(dtype)  # (B, L, 1)
        pooled = (context * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)  # (B, context_dim)
        c = self.t_embedder(t) + self.pooled_text_embedder(pooled)  # (B, D)
        context = self.context_embedder(context)  # (B, L, D)
        # a row without any real token would give NaN attention; let it attend to its padding instead
        attn_mask = context_mask | ~context_mask.any(dim=1, keepdim=True)  # (B, L)

        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                x = checkpoint(block, x, c, context, attn_mask, grid[0], use_reentrant=False)
            else:
                x = block(x, c, context, attn_mask, grid[0])

        x = self.final_layer(x, c)  # (B, N, pt*ph*pw*C)
        return self.unpatchify(x, grid)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        frames, height, width = grid
        p, pf = self.config.patch_size, self.config.patch_frames
        pattern = "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)"
        return rearrange(x, pattern, t=frames, h=height, w=width, pt=pf, ph=p, pw=p)  # (B, C, T, H, W)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# Presets: DiT's widths and depths (S, B, L, XL) plus a tiny CPU model. context_dim is the width of the text encoder
# the preset is meant for (T: the tiny open_clip tower; S, B: ViT-B text towers; L, XL: ViT-L-14's); callers override
# it with the encoder's actual width: vdit_config("VDiT-B/2", context_dim=encoder.width).

PRESETS: dict[str, VDiTConfig] = {
    "VDiT-T/2": VDiTConfig(hidden_size=64, depth=2, num_heads=4, context_dim=64),
    "VDiT-S/2": VDiTConfig(hidden_size=384, depth=12, num_heads=6, context_dim=512),
    "VDiT-B/2": VDiTConfig(hidden_size=768, depth=12, num_heads=12, context_dim=512),
    "VDiT-L/2": VDiTConfig(hidden_size=1024, depth=24, num_heads=16, context_dim=768),
    "VDiT-XL/2": VDiTConfig(hidden_size=1152, depth=28, num_heads=16, context_dim=768),
}


def vdit_config(preset: str, **overrides) -> VDiTConfig:
    """A copy of PRESETS[preset] with fields overridden, e.g. vdit_config("VDiT-S/2", in_channels=4)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown VDiT preset {preset!r}: expected one of {sorted(PRESETS)}")
    known = {f.name for f in fields(VDiTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown VDiTConfig field(s) {unknown}: expected among {sorted(known)}")
    return replace(PRESETS[preset], **overrides)
