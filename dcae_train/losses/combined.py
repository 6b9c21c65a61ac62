"""AutoencoderLoss: the loss of one phase of the DC-AE recipe. It owns the LPIPS net and the PatchGAN discriminator.

    generator:     L = l1 * |x_hat - x| + l2 * (x_hat - x)^2 + lpips * LPIPS(x_hat, x)          (= L_rec)
                       + gan * lambda * L_G(D(x_hat))                   from step gan_start on (phase 3)
    discriminator: L_D(D(x), D(sg(x_hat)))                              from step disc_start on

lambda is the adaptive weight ||grad L_rec|| / ||grad L_G|| at the decoder's last layer (taming/LDM), or 1.
Two start steps, because the peers that switch D and G on together see reconstructions degrade while D is still
random (taming #20, #44; recipe.md section 8): D can warm up first. Before `gan_start` the adversarial term is not
just zero-weighted: D is not run for the generator at all. `step` is the caller's batch counter (the trainer passes
its autoencoder-update count, not Lightning's doubled global_step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from dcae_train.losses.discriminator import DISC_NORMS, NLayerDiscriminator
from dcae_train.losses.gan import GAN_LOSSES, adaptive_weight, d_loss_fn, g_loss_fn
from dcae_train.losses.perceptual import TRUNK_WEIGHTS, PerceptualLoss
from dcae_train.losses.reconstruction import l1_loss, l2_loss


def _reject_unknown_keys(prefix: str):
    """Make `Config(**d)` raise ValueError naming an unknown key (a dataclass raises a bare TypeError)."""

    def wrap(cls):
        init = cls.__init__
        names = [f.name for f in fields(cls)]

        @functools.wraps(init)
        def checked_init(self, *args, **kwargs):
            unknown = sorted(set(kwargs) - set(names))
            if unknown:
                raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys are {', '.join(names)}")
            init(self, *args, **kwargs)

        cls.__init__ = checked_init
        return cls

    return wrap


@_reject_unknown_keys("loss.disc.")
@dataclass
class DiscConfig:
    """The PatchGAN discriminator (NLayerDiscriminator)."""

    layers: int = 3  # stride-2 levels; 3 -> 70x70 px patches (pix2pix, taming, [3P])
    width: int = 64  # channels of the first conv; doubles per level, capped at 8x
    norm: str = "batch"  # "batch" (taming), "group" (batch-size independent) or "none"

    def __post_init__(self) -> None:
        for key in ("layers", "width"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"loss.disc.{key}={value!r} must be a positive integer, e.g. layers=3, width=64")
        if self.norm not in DISC_NORMS:
            raise ValueError(f"loss.disc.norm={self.norm!r} is not supported; use one of {', '.join(DISC_NORMS)}")


@_reject_unknown_keys("loss.")
@dataclass
class LossConfig:
    """Loss weights and GAN settings of one phase (the recipe's `phases.pN.loss`)."""

    l1: float = 1.0  # [M] phases 1-2 train on L1 + LPIPS (efficientvit #143)
    l2: float = 0.0  # MSE, for ablations
    lpips: float = 1.0  # LDM uses 1.0; the [3P] re-implementation 0.25
    lpips_net: str = "vgg"  # trunk of the training LPIPS: "vgg" (LDM) or "alex" (the evaluation LPIPS)
    gan: float = 0.0  # adversarial weight; > 0 builds the discriminator (phase 3)
    gan_loss: str = "hinge"  # "hinge" (taming, [3P]) or "non_saturating"
    adaptive_weight: bool = True  # scale the GAN term by ||grad L_rec|| / ||grad L_G|| at the last layer
    max_adaptive_weight: float = 1e4  # clamp of that ratio (LDM)
    disc: DiscConfig = field(default_factory=DiscConfig)
    disc_start: int = 0  # first step on which the discriminator trains
    gan_start: int = 0  # first step on which the generator gets the adversarial term (>= disc_start)

    def __post_init__(self) -> None:
        if isinstance(self.disc, dict):
            self.disc = DiscConfig(**self.disc)
        elif not isinstance(self.disc, DiscConfig):
            raise ValueError(f"loss.disc={self.disc!r} must be a mapping such as {{layers: 3, width: 64}}")
        self._check_weights()
        self._check_choices()
        self._check_steps()

    def _check_weights(self) -> None:
        for key in ("l1", "l2", "lpips", "gan", "max_adaptive_weight"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"loss.{key}={value!r} must be a finite number >= 0")
        if self.l1 == self.l2 == self.lpips == 0:
            raise ValueError("loss.l1, loss.l2 and loss.lpips are all 0: set at least one, e.g. loss.l1=1.0")
        if self.max_adaptive_weight == 0:
            raise ValueError("loss.max_adaptive_weight=0 would switch the GAN term off; use loss.gan=0 for that")

    def _check_choices(self) -> None:
        if self.lpips_net not in TRUNK_WEIGHTS:
            raise ValueError(f"loss.lpips_net={self.lpips_net!r}: use one of {', '.join(TRUNK_WEIGHTS)}")
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"loss.gan_loss={self.gan_loss!r}: use one of {', '.join(GAN_LOSSES)}")
        if not isinstance(self.adaptive_weight, bool):
            raise ValueError(f"loss.adaptive_weight={self.adaptive_weight!r} must be true or false")

    def _check_steps(self) -> None:
        for key in ("disc_start", "gan_start"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"loss.{key}={value!r} must be an integer step >= 0")
        if self.gan_start < self.disc_start:
            raise ValueError(
                f"loss.gan_start={self.gan_start} < loss.disc_start={self.disc_start}: the generator would train "
                f"against an untrained discriminator; set gan_start >= disc_start (e.g. gan_start={self.disc_start})"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LossConfig:
        return cls(**dict(d or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of one phase. Only the discriminator's parameters are trainable."""

    def __init__(
        self,
        config: LossConfig,
        *,
        lpips_pretrained: bool = True,
        require_pretrained: bool = True,
        allow_download: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(config, LossConfig):
            raise ValueError(f"AutoencoderLoss takes a LossConfig, got {type(config).__name__}; use LossConfig(**d)")
        self.config = config
        self.perceptual: PerceptualLoss | None = None
        if config.lpips > 0:
            self.perceptual = PerceptualLoss(
                config.lpips_net,
                lpips_pretrained,
                require_pretrained=require_pretrained,
                allow_download=allow_download,
            )
        self.discriminator: NLayerDiscriminator | None = None
        if config.gan > 0:
            d = config.disc
            self.discriminator = NLayerDiscriminator(3, width=d.width, n_layers=d.layers, norm=d.norm)
        self._d_loss = d_loss_fn(config.gan_loss)
        self._g_loss = g_loss_fn(config.gan_loss)

    def gan_active(self, step: int) -> bool:
        """Whether the generator gets the adversarial term at `step`."""
        return self.discriminator is not None and step >= self.config.gan_start

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator trains at `step`."""
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_rec = l1 * L1 + l2 * L2 + lpips * LPIPS in fp32, and its detached terms."""
        cfg = self.config
        logs = {"loss_l1": l1_loss(x_hat, x), "loss_l2": l2_loss(x_hat, x)}
        rec = cfg.l1 * logs["loss_l1"] + cfg.l2 * logs["loss_l2"]
        if self.perceptual is not None:
            logs["loss_lpips"] = self.perceptual(x_hat, x)
            rec = rec + cfg.lpips * logs["loss_lpips"]
        logs["loss_rec"] = rec
        return rec, {k: v.detach() for k, v in logs.items()}

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        *,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss at `step` (0-dim fp32) and detached logs.

        `last_layer`: the weight of the decoder's last trainable layer, needed for the adaptive weight once the
        adversarial term is on. The caller must keep D's parameters out of this backward (Lightning's
        `toggled_optimizer` does) or zero D's gradients before the discriminator step.
        """
        loss, logs = self.reconstruction_loss(x, x_hat)
        if self.gan_active(step):
            assert self.discriminator is not None
            g_loss = self._g_loss(self.discriminator(x_hat))  # D's parameters are frozen by the caller here
            if self.config.adaptive_weight and x_hat.requires_grad and torch.is_grad_enabled():
                loss, lam = self._adaptive_total(loss, g_loss, x_hat, last_layer)
            else:
                lam = self._adaptive_weight(loss, g_loss, last_layer)
                loss = loss + self.config.gan * lam * g_loss
            logs.update(loss_gan=g_loss.detach(), adaptive_weight=lam, gan_weight=self.config.gan * lam)
        logs["loss_total"] = loss.detach()
        return loss, logs

    def _adaptive_total(self, rec, g_loss, x_hat, last_layer):
        """rec + gan * lambda * g_loss with LPIPS and D backpropagated once each, not twice.

        The textbook adaptive weight takes d rec / d w and d g / d w at the last layer w (each a backward through
        LPIPS or D) and then backpropagates the total loss (through LPIPS and D again). Here the two terms are
        backpropagated to the image x_hat once (g_rec, g_gan); their last-layer gradients come from x_hat's own
        (short) graph; and the returned loss has the value of the total but backpropagates
        g_rec + gan * lambda * g_gan from x_hat. Same lambda, same gradients, one LPIPS and one D backward less.
        """
        if last_layer is None or not last_layer.requires_grad:
            return None, self._adaptive_weight(rec, g_loss, last_layer)  # raises the explanatory error
        g_rec, g_gan = (
            _grad_or_zeros(t, x_hat, retain_graph=False) for t in (rec, g_loss)
        )  # each subgraph is walked once, then freed
        w_rec = _grad_or_zeros(x_hat, last_layer, grad_outputs=g_rec, retain_graph=True)
        w_gan = _grad_or_zeros(x_hat, last_layer, grad_outputs=g_gan, retain_graph=True)
        norm = torch.linalg.vector_norm
        lam = (norm(w_rec, dtype=torch.float32) / (norm(w_gan, dtype=torch.float32) + 1e-4)).clamp(
            0.0, self.config.max_adaptive_weight
        )
        lam = lam.detach()
        coef = self.config.gan * lam
        surrogate = (x_hat * (g_rec + coef.to(g_gan.dtype) * g_gan).to(x_hat.dtype)).float().sum()
        value = (rec.detach() + coef * g_loss.detach()).float()
        return surrogate - surrogate.detach() + value, lam

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None):
        """lambda (detached 0-dim fp32): the adaptive ratio, or 1 with adaptive_weight=false."""
        cfg = self.config
        if not cfg.adaptive_weight:
            return torch.ones((), device=rec.device)
        if last_layer is None:
            raise ValueError(
                "loss.adaptive_weight=true needs last_layer= (the weight of the decoder's last trainable conv) "
                "once the GAN term is on; pass it to generator_loss or set loss.adaptive_weight=false"
            )
        return adaptive_weight(rec, g_loss, last_layer, cfg.max_adaptive_weight)

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """D's loss at `step` (0-dim fp32) and detached logs; (None, {}) without a discriminator or before disc_start.

        Real and fake images go through D in separate calls, so BatchNorm statistics are never mixed (taming).
        """
        if not self.disc_active(step):
            return None, {}
        assert self.discriminator is not None
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(x_hat.detach()).float()
        loss = self._d_loss(logits_real, logits_fake)
        logs = {"loss_disc": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {k: v.detach() for k, v in logs.items()}


def _grad_or_zeros(out, inp, *, grad_outputs=None, retain_graph: bool) -> torch.Tensor:
    """d out / d inp (detached), zeros where `out` does not depend on `inp`."""
    (g,) = torch.autograd.grad(out, inp, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g.detach()
