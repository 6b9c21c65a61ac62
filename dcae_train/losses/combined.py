"""AutoencoderLoss: the loss of one phase of the DC-AE recipe. It owns the LPIPS net and the PatchGAN discriminator.

    generator:     L = l1 * |x_hat - x| + l2 * (x_hat - x)^2 + lpips * LPIPS(x_hat, x)          (= L_rec)
                       + gan * lambda * L_G(D(x_hat))                   from step gan_start on (phase 3)
    discriminator: L_D(D(x), D(sg(x_hat)))                              from step disc_start on

lambda is the adaptive weight ||grad L_rec|| / ||grad L_G|| at the decoder's last layer (taming/LDM), or 1.
Two start steps, because the peers that switch D and G on together see reconstructions degrade while D is still
random (taming #20, #44; docs/recipe.md, "Lessons from other trainers"): D can warm up first. Before `gan_start`
the adversarial term is not just zero-weighted: D is not run for the generator at all. `step` is the caller's batch
counter (the trainer passes its autoencoder-update count, not Lightning's doubled global_step).
"""

from __future__ import annotations

import torch
from torch import nn

from dcae_train.losses.config import LossConfig, PerceptualConfig
from dcae_train.losses.discriminator import NLayerDiscriminator
from dcae_train.losses.gan import adaptive_weight, d_loss_fn, g_loss_fn
from dcae_train.losses.perceptual import LPIPS
from dcae_train.losses.reconstruction import l1_loss, l2_loss


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of one phase. Only the discriminator's parameters are trainable."""

    def __init__(
        self,
        config: LossConfig,
        perceptual: PerceptualConfig | None = None,
        *,
        lpips_pretrained: bool = True,
        shapes_only: bool = False,
    ) -> None:
        """`perceptual`: where the LPIPS trunk comes from (default: required, downloaded when missing);
        `lpips_pretrained=False`: a random trunk that never touches the cache or the network (tests);
        `shapes_only=True`: built inside the caller's FakeTensorMode for cost estimates (see `LPIPS`)."""
        super().__init__()
        self.config = config
        self.perceptual: LPIPS | None = None
        if config.lpips > 0:
            p = perceptual or PerceptualConfig()
            self.perceptual = LPIPS(
                config.lpips_net,
                pretrained=lpips_pretrained,
                require_pretrained=p.require_pretrained,
                allow_download=p.allow_download,
                shapes_only=shapes_only,
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
