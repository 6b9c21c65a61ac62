"""Losses of the three-phase DC-AE recipe: L1/L2, LPIPS, PatchGAN discriminator, GAN losses, and their combination.

`AutoencoderLoss(LossConfig(...), PerceptualConfig(...))` is what the trainer builds; the rest is importable for
tests and tools. `LPIPS` is also the evaluation metric's LPIPS.
"""

from dcae_train.losses.combined import AutoencoderLoss
from dcae_train.losses.config import DISC_NORMS, GAN_LOSSES, LPIPS_NETS, DiscConfig, LossConfig, PerceptualConfig
from dcae_train.losses.discriminator import NLayerDiscriminator
from dcae_train.losses.gan import (
    adaptive_weight,
    d_loss_fn,
    g_loss_fn,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from dcae_train.losses.perceptual import LPIPS, TRUNKS, unit_normalize
from dcae_train.losses.reconstruction import l1_loss, l2_loss

__all__ = [
    "DISC_NORMS",
    "GAN_LOSSES",
    "LPIPS",
    "LPIPS_NETS",
    "TRUNKS",
    "AutoencoderLoss",
    "DiscConfig",
    "LossConfig",
    "NLayerDiscriminator",
    "PerceptualConfig",
    "adaptive_weight",
    "d_loss_fn",
    "g_loss_fn",
    "hinge_d_loss",
    "hinge_g_loss",
    "l1_loss",
    "l2_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "unit_normalize",
]
