"""Typed configs of the losses: `LossConfig` (a phase's `phases.pN.loss`), `DiscConfig` (its `disc`), `VFConfig`
(its `vf`: the VA-VAE alignment of the latent), `PerceptualConfig` (the run's `perceptual`: where the LPIPS trunk
comes from) and `FoundationConfig` (the run's `foundation`: which DINOv2 and where its weights are). Torch-free.

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
DISC_TYPES = ("patch", "dino")
COLLAPSE_ACTIONS = ("reset", "stop")
DIFFAUG_OPS = ("color", "translation", "cutout")  # DiffAugment's three transforms (Zhao et al. 2020)
# DINOv2 ViT-S/B/L with patch 14, with (-reg: 4 register tokens, Darcet et al. 2024) or without registers
FOUNDATION_MODELS = tuple(f"dinov2-vit{s}14{r}" for s in "sbl" for r in ("", "-reg"))


@dataclass
class DiscConfig:
    type: str = "patch"  # patch: the PatchGAN ([P][3P]) | dino: frozen DINOv2 trunk + trained heads (StyleGAN-T)
    layers: int = 3  # patch: stride-2 levels; 3 -> 70x70 px patches (pix2pix, taming, [3P])
    width: int = 64  # patch: channels of the first conv, doubling per level, capped at 8x; dino: head width
    norm: str = "batch"  # batch (taming) | group (independent of the batch size) | none
    trunk: str = "dinov2-vits14"  # dino: the frozen trunk; StyleGAN-T's discriminator uses a ViT-S
    trunk_layers: list[int] = field(default_factory=lambda: [2, 5, 8, 11])  # dino: blocks the heads judge [ours]
    trunk_path: str | None = None  # dino: the trunk's weights file; null = torch hub folder / Hugging Face cache
    input_size: int = 224  # dino: images are resized to this before the trunk (StyleGAN-T: 224)

    def __post_init__(self) -> None:
        check_choice("type", self.type, DISC_TYPES)
        check_at_least(self, ("layers", "width"), 1)
        check_choice("norm", self.norm, DISC_NORMS)
        check_choice("trunk", self.trunk, FOUNDATION_MODELS)
        require(bool(self.trunk_layers), "trunk_layers", [], "needs at least one block index", [11])
        ok = self.input_size >= 14 and self.input_size % 14 == 0
        require(ok, "input_size", self.input_size, "must be a multiple of 14 (the patch size)", 224)


@dataclass
class CollapseGuardConfig:
    """Act when the discriminator wins outright: D accuracy (the share of patch logits on the right side of 0) above
    `accuracy` for `steps` discriminator steps in a row. Each D step then reads the accuracy on the host (a sync)."""

    steps: int = 0  # consecutive D steps above `accuracy` that count as a collapse; 0 = off [ours]
    accuracy: float = 0.98  # [ours] a D that is right about 98% of patches gives G almost no useful gradient
    action: str = "reset"  # reset: a fresh D that warms up again (gan_start - disc_start steps) | stop: end the run

    def __post_init__(self) -> None:
        check_at_least(self, ("steps",), 0)
        require(0.5 < self.accuracy <= 1, "accuracy", self.accuracy, "must be in (0.5, 1] (0.5 is chance)", 0.98)
        check_choice("action", self.action, COLLAPSE_ACTIONS)


@dataclass
class DiffAugConfig:
    """DiffAugment on every image the discriminator sees (real and fake, D's and G's step); [] = off."""

    policy: list[str] = field(default_factory=list)  # subset of color, translation, cutout; the paper uses all three
    paired: bool = False  # a real image and its reconstruction get the same transform [ours]; the paper: independent
    translation: float = 0.125  # largest shift as a fraction of the side (DiffAugment: 1/8)
    cutout: float = 0.5  # side of the cut-out square as a fraction of the image side (DiffAugment: 1/2)

    def __post_init__(self) -> None:
        bad = [op for op in self.policy if op not in DIFFAUG_OPS]
        require(not bad, "policy", list(self.policy), f"use a subset of {', '.join(DIFFAUG_OPS)}", list(DIFFAUG_OPS))
        for name in ("translation", "cutout"):
            value = getattr(self, name)
            require(0 <= value < 1, name, value, "must be a fraction in [0, 1)", 0.125)


@dataclass
class VFConfig:
    """VA-VAE's vision-foundation alignment (Yao et al. 2025, LightningDiT `vavae`): a 1x1 projection of the latent
    is pulled towards the frozen foundation features of the image at the same grid positions:
        L_VF = distmat_weight * mean relu(|cos(z_i, z_j) - cos(f_i, f_j)| - distmat_margin)   (all position pairs)
             + cos_weight * mean relu(1 - cos_margin - cos(z_i, f_i))                        (each position)
    added to the generator loss as weight * lambda_vf * L_VF, lambda_vf = ||grad L_rec|| / ||grad L_VF|| at the
    encoder's last layer (adaptive) or 1."""

    weight: float = 0.0  # VF loss weight; 0 = off; VA-VAE vf_weight 0.1 (LightningDiT f16d32_vfdinov2.yaml)
    cos_margin: float = 0.5  # m1: positions within cos >= 1 - m1 of their feature cost nothing (VA-VAE)
    distmat_margin: float = 0.25  # m2: similarity differences below it cost nothing (VA-VAE)
    cos_weight: float = 1.0  # weight of the per-position cosine term (VA-VAE)
    distmat_weight: float = 1.0  # weight of the distance-matrix term (VA-VAE)
    adaptive_weight: bool = True  # scale by |grad L_rec| / |grad L_VF| at the encoder's last layer (VA-VAE adaptive_vf)
    max_adaptive_weight: float = 1e8  # clamp of that ratio (VA-VAE)

    def __post_init__(self) -> None:
        for name in ("weight", "cos_margin", "distmat_margin", "cos_weight", "distmat_weight"):
            value = getattr(self, name)
            require(math.isfinite(value) and value >= 0, name, value, "must be a finite number >= 0")
        require(self.max_adaptive_weight > 0, "max_adaptive_weight", self.max_adaptive_weight, "must be > 0", 1e8)
        if self.weight > 0 and self.cos_weight == self.distmat_weight == 0:
            raise ConfigError("cos_weight", 0.0, "and {p}distmat_weight are both 0 with {p}weight > 0", 1.0)

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class RepaConfig:
    """REPA-style alignment (Yu et al. 2025, "Representation Alignment for Generation"; REPA-E): an intermediate
    feature of the encoder or decoder, average-pooled to the latent grid and projected by a trained MLP, is pulled
    towards the frozen foundation features of the image: L_REPA = 1 - mean_i cos(MLP(h)_i, f_i) (REPA's negative
    cosine, shifted so that perfect alignment is 0)."""

    weight: float = 0.0  # REPA loss weight; 0 = off; REPA uses 0.5
    where: str = "encoder"  # encoder | decoder: whose stage output is aligned
    stage: int = 1  # index into encoder.down_blocks / decoder.up_blocks [ours]; recipes pick a middle stage
    hidden: int = 2048  # width of the 3-layer SiLU MLP projector (REPA: 2048)

    def __post_init__(self) -> None:
        require(math.isfinite(self.weight) and self.weight >= 0, "weight", self.weight, "must be a finite number >= 0")
        check_choice("where", self.where, ("encoder", "decoder"))
        check_at_least(self, ("stage",), 0)
        check_at_least(self, ("hidden",), 1)

    @property
    def enabled(self) -> bool:
        return self.weight > 0


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
    vf: VFConfig = field(default_factory=VFConfig)  # VA-VAE alignment of the latent with DINOv2 (weight 0 = off)
    repa: RepaConfig = field(default_factory=RepaConfig)  # REPA-style alignment of a stage's feature (weight 0 = off)
    diffaug: DiffAugConfig = field(default_factory=DiffAugConfig)  # DiffAugment of D's inputs (policy [] = off)
    lecam: float = 0.0  # LeCAM regularisation weight on D (Tseng et al. 2021); 0 = off
    lecam_decay: float = 0.99  # decay of LeCAM's EMAs of D's real and fake outputs (LeCAM's code)
    r1: float = 0.0  # R1 gradient penalty gamma on real images (Mescheder et al. 2018); 0 = off
    r1_every: int = 16  # lazy R1: every N discriminator steps, scaled by N (StyleGAN2's interval)
    collapse: CollapseGuardConfig = field(default_factory=CollapseGuardConfig)  # collapse guard (steps 0 = off)
    disc_start: int = 0  # first step on which the discriminator trains
    gan_start: int = 0  # first step on which the generator sees the adversarial term (>= disc_start)

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "lpips", "gan", "max_adaptive_weight", "lecam", "r1"):
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
        check_at_least(self, ("r1_every",), 1)
        require(0 <= self.lecam_decay < 1, "lecam_decay", self.lecam_decay, "must be in [0, 1)", 0.99)
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


@dataclass
class FoundationConfig:
    """The frozen vision foundation model the alignment losses compare with (built by timm, weights from a local
    file or cache through `dcae_train.pretrained`; never downloaded)."""

    model: str = "dinov2-vitl14"  # dinov2-vit{s,b,l}14[-reg]; VA-VAE aligns with DINOv2 ViT-L/14 (no registers)
    path: str | None = None  # the weights file (Meta's .pth or timm's .safetensors); null = torch hub / HF cache
    sha256: str | None = None  # pin the file's SHA-256 (full or >= 8 hex digits); null = none published [ours]
    layer: int = -1  # the block whose tokens are the features; -1 = the last (VA-VAE, after the final norm)
    # null: the image is resized so the token grid is the latent grid (VA-VAE); N: resized to N px and the tokens
    # average-pooled to the latent grid [ours] (at f32, 256 px makes an 8x8 grid: DINOv2 would see only 112 px)
    input_size: int | None = None
    # Real recipes need the pretrained weights and stop before training without them; the quickstart and the
    # smoke runs may fall back to random weights (loudly, recorded as foundation_pretrained in run.json).
    require_pretrained: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, FOUNDATION_MODELS)
        pin = self.sha256
        ok = pin is None or (len(pin) >= 8 and all(c in "0123456789abcdefABCDEF" for c in pin))
        require(ok, "sha256", pin, "must be hex digits (at least the first 8 of the file's SHA-256) or null")
        require(
            self.input_size is None or self.input_size >= 14, "input_size", self.input_size, "must be >= 14 or null"
        )
