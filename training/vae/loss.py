"""The VAE's training loss: reconstruction + a KL weight, as the LDM and CogVideoX autoencoders weigh them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.vae.config import VAELossConfig


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor,
             config: VAELossConfig) -> torch.Tensor:
    """Reconstruction per pixel value + kl_weight x KL(q(z|x) || N(0, I)) summed over the latent per pixel value,
    + gradient_weight x L1 between the finite differences (x, y, t) of input and output."""
    x, reconstruction = x.float(), reconstruction.float()
    if config.reconstruction == "l1":
        loss = F.l1_loss(reconstruction, x)
    else:
        loss = F.mse_loss(reconstruction, x)
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum()
    loss = loss + config.kl_weight * kl / x.numel()
    if config.gradient_weight:
        for dim in (2, 3, 4) if x.shape[2] > 1 else (3, 4):
            loss = loss + config.gradient_weight * F.l1_loss(reconstruction.diff(dim=dim), x.diff(dim=dim))
    return loss
