"""Alignment with a frozen vision foundation model: VA-VAE's VF loss on the latent, and a REPA-style loss on an
intermediate feature (`RepaLoss`, below). The VF loss (Yao et al. 2025, "Reconstruction
vs. Generation", LightningDiT `vavae`). Written from the paper and its public code, ours.

    z (B, c, h, w) --1x1 conv, no bias (trained)--> z' (B, D, h, w)      f = DINOv2(x) (B, D, h, w), frozen
    distmat = mean_{b,i,j} relu(|cos(z'_i, z'_j) - cos(f_i, f_j)| - m2)    the latent keeps the features' geometry
    cos     = mean_{b,i}   relu(1 - m1 - cos(z'_i, f_i))                   each position points where its feature does
    L_VF    = distmat_weight * distmat + cos_weight * cos

Both terms are zero once the projected latent matches the features up to the margins (the margins leave the latent
room for what reconstruction needs). The projector is trained with the autoencoder and saved in our checkpoints,
but it is not part of the autoencoder: exports never contain it. Computed in fp32 (cosines of bf16 vectors are too
coarse for a 0.25 margin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcae_train.losses.config import RepaConfig, VFConfig


def vf_terms(
    z_proj: torch.Tensor, feats: torch.Tensor, cos_margin: float, distmat_margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(distmat, cos) terms of the VF loss for (B, D, h, w) projected latents and features of the same shape."""
    if z_proj.shape != feats.shape:
        raise ValueError(f"VF loss: projected latent {tuple(z_proj.shape)} and features {tuple(feats.shape)} differ")
    zn = F.normalize(z_proj.flatten(2).float(), dim=1)  # (B, D, N), unit vectors per position
    fn = F.normalize(feats.flatten(2).float(), dim=1)
    sim_z = torch.einsum("bdi,bdj->bij", zn, zn)  # (B, N, N) cosine similarities between positions
    sim_f = torch.einsum("bdi,bdj->bij", fn, fn)
    distmat = F.relu((sim_z - sim_f).abs() - distmat_margin).mean()
    cos = F.relu(1 - cos_margin - (zn * fn).sum(dim=1)).mean()  # (B, N) cos(z'_i, f_i)
    return distmat, cos


class VFLoss(nn.Module):
    """The VF loss of one phase: owns the trained projector latent -> feature dim."""

    def __init__(self, config: VFConfig, latent_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        self.projector = nn.Conv2d(latent_channels, feature_dim, 1, bias=False)  # VA-VAE reverse_proj: bias=False

    def forward(self, z: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_VF (0-dim fp32) of latents (B, c, h, w), c <= latent_channels, and features (B, D, h, w)."""
        cfg = self.config
        w = self.projector.weight[:, : z.shape[1]]  # a latent prefix (DC-AE 1.5) reads the first c input columns
        with torch.autocast(device_type=z.device.type, enabled=False):
            z_proj = F.conv2d(z.float(), w.float())  # (B, D, h, w)
            distmat, cos = vf_terms(z_proj, feats, cfg.cos_margin, cfg.distmat_margin)
        loss = cfg.distmat_weight * distmat + cfg.cos_weight * cos
        return loss, {"loss_vf": loss.detach(), "loss_vf_distmat": distmat.detach(), "loss_vf_cos": cos.detach()}


class RepaLoss(nn.Module):
    """REPA-style alignment of a feature map h (B, C, H', W'): pooled to the features' grid, projected by a trained
    3-layer SiLU MLP (1x1 convs: one MLP per position, as REPA's per-token MLP), L = 1 - mean cos(MLP(h), f)."""

    def __init__(self, config: RepaConfig, in_channels: int, feature_dim: int) -> None:
        super().__init__()
        self.config = config
        w = config.hidden
        self.projector = nn.Sequential(
            nn.Conv2d(in_channels, w, 1), nn.SiLU(), nn.Conv2d(w, w, 1), nn.SiLU(), nn.Conv2d(w, feature_dim, 1)
        )

    def forward(self, h: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = F.adaptive_avg_pool2d(h.float(), feats.shape[-2:])  # (B, C, h, w): the latent grid [ours]
            loss = repa_loss(self.projector(h), feats)
        return loss, {"loss_repa": loss.detach()}


def repa_loss(h_proj: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """1 - mean over batch and positions of cos(h_proj_i, f_i), for (B, D, h, w) maps of the same shape."""
    if h_proj.shape != feats.shape:
        raise ValueError(f"REPA loss: projected feature {tuple(h_proj.shape)} and features {tuple(feats.shape)} differ")
    return 1 - F.cosine_similarity(h_proj.float(), feats.float(), dim=1).mean()
