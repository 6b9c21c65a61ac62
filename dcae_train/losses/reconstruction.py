"""Pixel reconstruction losses: L1 and L2, mean over every element, computed in fp32.

The recipe's "reconstruction loss" for phases 1 and 2 is L1 plus LPIPS (efficientvit #143); L2 is kept for
ablations. Inputs are images in [-1, 1], (B, C, H, W); under bf16 autocast the decoder output is bf16, so both
operands are cast to fp32 first: a bf16 mean over millions of pixels loses the small differences we train on.
"""

from __future__ import annotations

import torch


def l1_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean |x_hat - x|, a 0-dim fp32 tensor."""
    _check_same_shape(x_hat, x)
    return (x_hat.float() - x.float()).abs().mean()


def l2_loss(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean (x_hat - x)^2 (the MSE), a 0-dim fp32 tensor."""
    _check_same_shape(x_hat, x)
    return (x_hat.float() - x.float()).pow(2).mean()


def _check_same_shape(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    # Broadcasting would silently compare every reconstruction with every image.
    if x_hat.shape != x.shape:
        raise ValueError(
            f"reconstruction shape {tuple(x_hat.shape)} != image shape {tuple(x.shape)}; "
            "the decoder output must have the input's shape (check the resolution is a multiple of the compression)"
        )
