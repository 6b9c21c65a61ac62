"""The FID feature extractors: the Inception-v3 of the protocol, and a tiny random stand-in for tests. Offline.

The Inception weights come from the registry in `dcae_train.pretrained` (an explicit path or
`$TORCH_HOME/hub/checkpoints/`, SHA-256 checked, never downloaded here). LPIPS is `dcae_train.losses.LPIPS`,
the same wrapper as the training loss.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from dcae_train.pretrained import INCEPTION, FrozenModule, weight_file


# Inception-v3 for FID -----------------------------------------------------------------------------------
class InceptionFeatures(FrozenModule):
    """pool3 (2048-d) features of the FID Inception-v3, preprocessed as pytorch-fid and the DC-AE evaluator:
    uint8 / 255 -> bilinear resize to 299 (align_corners=False, no antialias) -> [-1, 1].

    The network graph is torch-fidelity's port of the TF Inception (the same weights file as pytorch-fid);
    only its layers are used, not its TF1-style resize.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, verify: bool = True) -> None:
        super().__init__()
        weights = weight_file(INCEPTION, weights_path, verify=verify)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        self.freeze()

    @torch.no_grad()
    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        if x_u8.dtype != torch.uint8:
            raise ValueError(f"InceptionFeatures takes uint8 images (quantise first), got {x_u8.dtype}")
        n = self.net
        x = x_u8.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0  # (B, 3, 299, 299)
        x = n.MaxPool_1(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))))  # (B, 64, 73, 73)
        x = n.MaxPool_2(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)))  # (B, 192, 35, 35)
        for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d"):
            x = getattr(n, block)(x)
        x = n.Mixed_7a(n.Mixed_6e(x))  # (B, 1280, 8, 8)
        x = n.Mixed_7c(n.Mixed_7b(x))  # (B, 2048, 8, 8)
        return n.AvgPool(x).flatten(1)  # (B, 2048)


class TinyFeatures(FrozenModule):
    """A small random conv net standing in for Inception in tests and smoke runs: uint8 in, (B, dim) out."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_features = dim
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, dim, 3, stride=2, padding=1), nn.ReLU()
        )
        for p in self.net.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        self.freeze()

    @torch.no_grad()
    def forward(self, x_u8: torch.Tensor) -> torch.Tensor:
        x = x_u8.float() / 127.5 - 1.0
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        return self.net(x).mean(dim=(2, 3))  # (B, dim)


def build_feature_extractor(kind: str = "inception", weights_path: str | None = None, verify: bool = True) -> nn.Module:
    """'inception' (the protocol; offline weights) or 'tiny' (random, for tests: FID values are not comparable)."""
    if kind == "inception":
        return InceptionFeatures(weights_path, verify=verify)
    if kind == "tiny":
        return TinyFeatures()
    raise ValueError(f"fid feature extractor {kind!r}: use 'inception' (official) or 'tiny' (tests only)")


def extractor_id(extractor: nn.Module) -> str:
    """Names the feature space; part of the reference-statistics cache key."""
    if isinstance(extractor, InceptionFeatures):
        return "inception-pool3-pytorchfid"
    if isinstance(extractor, TinyFeatures):
        return f"tiny{extractor.num_features}"
    return type(extractor).__name__
