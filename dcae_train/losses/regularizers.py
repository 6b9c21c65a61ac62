"""Discriminator regularisers, both in fp32 with autocast off (bf16 gradients of D are too coarse for a penalty).

- LeCAM (Tseng et al. 2021, "Regularizing Generative Adversarial Networks under Limited Data"): keeps D's
  predictions on real and fake images from drifting apart by anchoring each to an EMA of the other's mean:
      R_LC = E relu(D(x) - ema_fake)^2 + E relu(ema_real - D(x_hat))^2,   ema_* <- decay * ema_* + (1 - decay) E D(.)
  The EMAs are buffers, so they travel with the checkpoint and a resumed run continues them.
- R1 (Mescheder et al. 2018, "Which Training Methods for GANs do actually Converge?"): a gradient penalty on real
  images, R1 = gamma / 2 * E ||grad_x sum D(x)||^2 (sum over D's patch logits per image). Lazy as in StyleGAN2
  (Karras et al. 2020): computed every `every` steps and multiplied by `every`, so its average strength is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class LeCAM(nn.Module):
    def __init__(self, decay: float = 0.99) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """R_LC against the EMAs of the previous steps, then the EMAs take this step's means (no gradient)."""
        real, fake = logits_real.float(), logits_fake.float()
        reg = F.relu(real - self.ema_fake).pow(2).mean() + F.relu(self.ema_real - fake).pow(2).mean()
        with torch.no_grad():
            self.ema_real.lerp_(real.mean(), 1 - self.decay)
            self.ema_fake.lerp_(fake.mean(), 1 - self.decay)
        return reg


def r1_penalty(discriminator: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """E ||grad_x sum D(x)||^2 over the batch of real images `x`, in fp32 with autocast off (0-dim).

    The penalty's backward differentiates D's input gradient (double backward). Fused attention kernels (flash,
    memory-efficient) have no double backward, so the DINO discriminator's ViT runs on the math kernel here."""
    with torch.autocast(device_type=x.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
        x = x.detach().float().requires_grad_(True)
        # D sees a view of x, not the leaf itself: same values and gradient, and module hooks that follow autograd
        # (FlopCounterMode's, which the cost command and its tests use) cannot handle a leaf module input in grad()
        logits = discriminator(x.view_as(x)).float()
        (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)  # the penalty's own gradient reaches D
    return grad.pow(2).flatten(1).sum(dim=1).mean()
