"""Typed configs of the losses: `LossConfig` (a phase's `phases.pN.loss`), `DiscConfig` (its `disc`) and
`PerceptualConfig` (the run's `perceptual`: where the LPIPS trunk comes from). Torch-free.

The class defaults are those of phases 1 and 2 of the DC-AE recipe (L1 + LPIPS, no GAN); phase 3's GAN values
are the defaults of `phases.p3` in `dcae_train/training/config.py`. Sources: docs/recipe.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dcae_train.schema import ConfigError, check_at_least, check_choice, require

LPIPS_NETS = ("vgg", "alex")  # LPIPS trunks: VGG16 (LDM's training loss) and AlexNet (the evaluation LPIPS)
GAN_LOSSES = ("hinge", "non_saturating")
DISC_NORMS = ("batch", "group", "none")


@dataclass
class DiscConfig:
    layers: int = 3  # stride-2 levels of the PatchGAN; 3 -> 70x70 px patches (pix2pix, taming, [3P])
    width: int = 64  # channels of the first conv; doubles per level, capped at 8x
    norm: str = "batch"  # batch (taming) | group (independent of the batch size) | none

    def __post_init__(self) -> None:
        check_at_least(self, ("layers", "width"), 1)
        check_choice("norm", self.norm, DISC_NORMS)


@dataclass
class LossConfig:
    """Generator:  l1 * L1 + l2 * L2 + lpips * LPIPS  (+ gan * lambda * L_G from gan_start on);
    discriminator: L_D from disc_start on. lambda is the adaptive weight (taming/LDM) or 1."""

    l1: float = 1.0  # [M] phases 1-2 train on L1 + LPIPS (mit-han-lab/efficientvit#143)
    l2: float = 0.0  # MSE weight, for ablations
    lpips: float = 1.0  # LPIPS weight; [ours] 1.0 as LDM (the [3P] re-implementation used 0.25)
    lpips_net: str = "vgg"  # trunk of the training LPIPS: vgg (LDM) | alex (the evaluation LPIPS, ~10x cheaper)
    gan: float = 0.0  # adversarial weight; > 0 builds the discriminator (phase 3)
    gan_loss: str = "hinge"  # hinge (taming, [3P]) | non_saturating
    adaptive_weight: bool = True  # scale the GAN term by |grad L_rec| / |grad L_G| at the decoder's last layer
    max_adaptive_weight: float = 1e4  # clamp of the adaptive weight (LDM)
    disc: DiscConfig = field(default_factory=DiscConfig)  # the PatchGAN discriminator
    disc_start: int = 0  # first step on which the discriminator trains
    gan_start: int = 0  # first step on which the generator sees the adversarial term (>= disc_start)

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "lpips", "gan", "max_adaptive_weight"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
        if self.l1 == self.l2 == self.lpips == 0:
            raise ConfigError("l1", 0.0, "{p}l1, {p}l2 and {p}lpips are all 0: set at least one", 1.0)
        require(
            self.max_adaptive_weight > 0,
            "max_adaptive_weight",
            self.max_adaptive_weight,
            "0 would switch the GAN term off; use gan=0",
        )
        check_choice("lpips_net", self.lpips_net, LPIPS_NETS)
        check_choice("gan_loss", self.gan_loss, GAN_LOSSES)
        check_at_least(self, ("disc_start", "gan_start"), 0)
        if self.gan_start < self.disc_start:
            raise ConfigError(
                "gan_start",
                self.gan_start,
                f"< {{p}}disc_start={self.disc_start}: the generator would train against an untrained discriminator",
                self.disc_start,
            )


@dataclass
class PerceptualConfig:
    """Where the LPIPS trunk weights come from (its backbone is each phase's loss.lpips_net)."""

    # Real recipes need the pretrained trunk and stop before training without it; the quickstart may fall back
    # to a random trunk (loudly, and recorded as lpips_pretrained in run.json and the checkpoints).
    require_pretrained: bool = True
    allow_download: bool = True  # fetch a missing trunk file from download.pytorch.org (SHA-256 checked)
