"""Adversarial losses on discriminator logits, and the adaptive GAN weight of taming/LDM.

Sign convention: D outputs one logit per patch, high = "real". All losses are means over every logit and are
computed in fp32 (the logits are cast first), because the discriminator may run under bf16 autocast.

- hinge (taming, the [3P] DC-AE phase 3): D = 1/2 (E relu(1 - D(x)) + E relu(1 + D(x_hat))), G = -E D(x_hat).
  The G term is unbounded below, so a negative generator loss is expected (taming #137).
- non-saturating (Goodfellow et al. 2014): D = 1/2 (E softplus(-D(x)) + E softplus(D(x_hat))),
  G = E softplus(-D(x_hat)) = -E log sigmoid(D(x_hat)).
The 1/2 on the D losses keeps both forms on the scale taming logs (D at chance: hinge 1.0, NS log 2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake.float()).mean()


_D_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_d_loss,
    "non_saturating": non_saturating_d_loss,
}
_G_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": hinge_g_loss,
    "non_saturating": non_saturating_g_loss,
}


def d_loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The discriminator loss called `name` (one of `losses.config.GAN_LOSSES`)."""
    return _D_LOSSES[name]


def g_loss_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The generator's adversarial loss called `name` (one of `losses.config.GAN_LOSSES`)."""
    return _G_LOSSES[name]


def adaptive_weight(
    rec_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer_weight: torch.Tensor,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """lambda = ||d rec / d w|| / (||d g / d w|| + 1e-4) at the decoder's last layer w (Esser et al. 2021, eq. 7).

    Balances the adversarial gradient against the reconstruction gradient where both reach the image. Gradients are
    taken with `retain_graph=True` (the caller backpropagates the total loss afterwards) and never accumulate into
    `.grad`. Returned as a detached 0-dim fp32 tensor clamped to [0, max_weight]: d_weight of 25-30 and worse
    precede the reconstructions degrading when D switches on (taming #20, #44), so callers should log it.
    """
    if not torch.is_grad_enabled():
        raise RuntimeError("adaptive_weight needs autograd: call it outside torch.no_grad() / inference_mode()")
    if not last_layer_weight.requires_grad:
        raise ValueError(
            "adaptive_weight: last_layer_weight does not require grad; pass the weight of the decoder's last "
            "trainable conv (it must be trained in this phase), or set adaptive_weight=false"
        )
    rec_norm = _grad_norm(rec_loss, last_layer_weight)
    g_norm = _grad_norm(g_loss, last_layer_weight)
    return (rec_norm / (g_norm + 1e-4)).clamp(0.0, max_weight).detach()


def _grad_norm(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # allow_unused: a term that does not reach `weight` contributes a zero gradient, not an autograd error.
    (grad,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    if grad is None:
        return torch.zeros((), device=weight.device)
    return torch.linalg.vector_norm(grad.detach(), dtype=torch.float32)
