"""Losses of the three-phase DC-AE recipe: L1/L2, LPIPS, PatchGAN discriminator, GAN losses, and their combination.

`AutoencoderLoss(LossConfig(**phase.loss))` is what the trainer builds; the rest is importable for tests and tools.
"""

from dcae_train.losses.combined import AutoencoderLoss, DiscConfig, LossConfig
from dcae_train.losses.discriminator import DISC_NORMS, NLayerDiscriminator
from dcae_train.losses.gan import (
    GAN_LOSSES,
    adaptive_weight,
    d_loss_fn,
    g_loss_fn,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from dcae_train.losses.perceptual import TRUNK_WEIGHTS, PerceptualLoss, trunk_file, unit_normalize, verify_trunk_file
from dcae_train.losses.reconstruction import l1_loss, l2_loss

__all__ = [
    "DISC_NORMS",
    "GAN_LOSSES",
    "TRUNK_WEIGHTS",
    "AutoencoderLoss",
    "DiscConfig",
    "LossConfig",
    "NLayerDiscriminator",
    "PerceptualLoss",
    "adaptive_weight",
    "d_loss_fn",
    "g_loss_fn",
    "hinge_d_loss",
    "hinge_g_loss",
    "l1_loss",
    "l2_loss",
    "non_saturating_d_loss",
    "non_saturating_g_loss",
    "trunk_file",
    "unit_normalize",
    "verify_trunk_file",
]
