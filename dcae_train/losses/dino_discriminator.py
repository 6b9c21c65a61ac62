"""DINO-feature discriminator: a frozen DINOv2 trunk and small trained heads on the patch tokens of several of
its blocks, one logit per token per head (the design of StyleGAN-T, Sauer et al. 2023, and Projected GANs: a
pretrained feature space makes D strong from the first step and hard to overfit). Written from the papers, ours.

    x (B, 3, H, W) in [-1, 1] -> ImageNet-normalised, resized to input_size (224)
      -> frozen ViT blocks -> tokens of blocks l_1..l_k, each (B, D, 16, 16)
      -> head_k: conv3x3 D->C, norm, LeakyReLU(0.2), conv1x1 C->1  -> (B, 1, 16, 16) logits
    output: every head's logits, concatenated (B, 1, k * 256): the hinge / non-saturating losses and R1 take them
    as they take the PatchGAN's patch logits.

The trunk is frozen (eval, no parameter gradients) but differentiable in its input: the generator's adversarial
term backpropagates through it to x_hat. Its weights come through the registry like the foundation model's and
are not saved in our checkpoints nor in the discriminator export (they come from their file).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dcae_train.losses.foundation import PATCH, FoundationModel


class DinoDiscriminator(nn.Module):
    def __init__(
        self, trunk: FoundationModel, layers: list[int], *, width: int = 64, norm: str = "group", input_size: int = 224
    ) -> None:
        super().__init__()
        if input_size % PATCH:
            raise ValueError(f"DINO discriminator input_size={input_size} must be a multiple of the patch size {PATCH}")
        self.trunk = trunk
        self.layers = list(layers)
        self.input_size = input_size
        self.heads = nn.ModuleList(_head(trunk.dim, width, norm) for _ in self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> (B, 1, k * t) logits, t tokens per layer."""
        size = (self.input_size, self.input_size)
        tokens = self.trunk.token_maps(x, size, self.layers)  # k x (B, D, h, w)
        logits = [head(t).flatten(2) for head, t in zip(self.heads, tokens, strict=True)]  # k x (B, 1, h * w)
        return torch.cat(logits, dim=2)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.trunk.train(False)  # FrozenModule: stays in eval
        return self

    def reset_parameters(self, seed: int | None = None) -> None:
        """Fresh heads (the trunk is not trained, so it is not reset); seeded for the same result on every rank."""
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            fresh = nn.ModuleList(_head(self.trunk.dim, *self._head_shape()) for _ in self.layers)
        self.heads.load_state_dict(fresh.state_dict())

    def _head_shape(self) -> tuple[int, str]:
        conv, norm = self.heads[0][0], self.heads[0][1]
        kind = "group" if isinstance(norm, nn.GroupNorm) else "batch" if isinstance(norm, nn.BatchNorm2d) else "none"
        return conv.out_channels, kind


def _head(dim: int, width: int, norm: str) -> nn.Sequential:
    if norm == "batch":
        n: nn.Module = nn.BatchNorm2d(width)
    elif norm == "group":
        n = nn.GroupNorm(math.gcd(32, width), width)
    else:
        n = nn.Identity()
    return nn.Sequential(nn.Conv2d(dim, width, 3, padding=1), n, nn.LeakyReLU(0.2), nn.Conv2d(width, 1, 1))
