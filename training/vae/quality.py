"""Reconstruction quality of uint8 videos: PSNR and SSIM per clip, and the side-by-side frames (original |
reconstruction) the GIFs show."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def psnr(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """(B, T, H, W, 3) uint8 each -> (B,) PSNR in dB over each clip's pixels (peak 255)."""
    a, b = _float_pair(original, reconstruction)
    mse = (a - b).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).numpy()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def ssim(original: np.ndarray, reconstruction: np.ndarray, window: int = 11) -> np.ndarray:
    """(B, T, H, W, 3) uint8 each -> (B,) SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
    K2 0.03), per frame and channel over the valid window positions, averaged per clip. Frames smaller than the
    window use a window of their smaller side."""
    a, b = _float_pair(original, reconstruction)
    batch = a.shape[0]
    a = a.permute(0, 1, 4, 2, 3).flatten(0, 2)[:, None]  # (B*T*3, 1, H, W)
    b = b.permute(0, 1, 4, 2, 3).flatten(0, 2)[:, None]
    size = min(window, a.shape[-1], a.shape[-2])
    g = _gaussian_window(size)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        x = F.conv2d(x, g.view(1, 1, 1, -1))
        return F.conv2d(x, g.view(1, 1, -1, 1))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return value.reshape(batch, -1).mean(dim=1).numpy()


def _float_pair(original: np.ndarray, reconstruction: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if original.shape != reconstruction.shape or original.ndim != 5:
        raise ValueError(f"expected two (B, T, H, W, 3) videos of one shape, got {original.shape} and "
                         f"{reconstruction.shape}")
    return (torch.from_numpy(np.ascontiguousarray(original)).double() / 255,
            torch.from_numpy(np.ascontiguousarray(reconstruction)).double() / 255)


def side_by_side(original: np.ndarray, reconstruction: np.ndarray, pad: int = 2) -> np.ndarray:
    """(B, T, H, W, 3) each -> (T, B*(H+pad)-pad, 2W+pad, 3) on white: one row per clip, original left,
    reconstruction right."""
    b, t, h, w, c = original.shape
    out = np.full((t, b * (h + pad) - pad, 2 * w + pad, c), 255, np.uint8)
    for i in range(b):
        top = i * (h + pad)
        out[:, top:top + h, :w] = original[i]
        out[:, top:top + h, w + pad:] = reconstruction[i]
    return out
