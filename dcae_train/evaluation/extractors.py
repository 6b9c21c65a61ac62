"""Frozen networks behind the metrics: LPIPS (AlexNet or VGG16 trunk) and the FID Inception-v3, offline.

Weights never download here. Each file is looked up at an explicit path or in `$TORCH_HOME/hub/checkpoints/`
(default `~/.cache/torch`); when it is missing, the error names the file, the folder and where to get it.
torch.hub checks hashes only when it downloads, so a wrong file would load silently (pitfalls.md 3): the
SHA-256 prefix that the official file names carry is verified before loading.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# Weight files -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFile:
    names: tuple[str, ...]  # accepted file names in the hub folder, preferred first
    sha256_prefix: str
    url: str
    what: str


ALEXNET = WeightFile(
    ("alexnet-owt-7be5be79.pth",),
    "7be5be79",
    "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "torchvision AlexNet (LPIPS trunk)",
)
VGG16 = WeightFile(
    ("vgg16-397923af.pth",),
    "397923af",
    "https://download.pytorch.org/models/vgg16-397923af.pth",
    "torchvision VGG16 (LPIPS trunk)",
)
# pytorch-fid and torch-fidelity publish the same converted TF Inception under two names (same SHA-256).
INCEPTION = WeightFile(
    ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"),
    "6726825d",
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    "FID Inception-v3 (pytorch-fid / torch-fidelity)",
)


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # honours $TORCH_HOME and torch.hub.set_dir()


def find_weights(spec: WeightFile, path: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The weight file to load: `path` if given, else the first of `spec.names` in the hub folder."""
    if path is not None:
        found = Path(path)
        if not found.is_file():
            raise FileNotFoundError(
                f"{spec.what} weights not found at {found}: place {spec.names[0]} there ({spec.url})"
            )
    else:
        candidates = [hub_dir() / n for n in spec.names]
        found = next((c for c in candidates if c.is_file()), None)  # type: ignore[assignment]
        if found is None:
            raise FileNotFoundError(
                f"{spec.what} weights are missing: place {spec.names[0]} in {hub_dir()} (download it from "
                f"{spec.url} on a machine with network; set TORCH_HOME to use another folder) or pass the file's path"
            )
    if verify:
        _verify_sha256(found, spec)
    return found


def _verify_sha256(path: Path, spec: WeightFile) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(spec.sha256_prefix):
        raise ValueError(
            f"{path} is not the {spec.what} file: its SHA-256 starts with {h.hexdigest()[:8]}, expected "
            f"{spec.sha256_prefix}. Re-download {spec.url} (or pass verify=False for a deliberately different file)"
        )


class Frozen(nn.Module):
    """Base for metric networks: eval mode forever, no gradients, excluded from training checkpoints by owner."""

    def train(self, mode: bool = True):
        return super().train(False)  # fixed metric net: stay in eval even when Lightning calls .train()


# LPIPS --------------------------------------------------------------------------------------------------
_LPIPS_TRUNK = {"alex": ALEXNET, "vgg": VGG16}


class LPIPSMetric(Frozen):
    """LPIPS v0.1 (the `lpips` package's calibrated linear heads) on a torchvision trunk loaded offline.

    `forward(x, x_hat)` takes images in [0, 1] (uint8 / 255, as torchmetrics' `normalize=True` in the official
    protocol) and returns (B,) distances. `random_trunk=True` keeps the random trunk: deterministic,
    meaningless values for tests.
    """

    def __init__(
        self,
        net: str = "alex",
        trunk_path: str | os.PathLike | None = None,
        random_trunk: bool = False,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if net not in _LPIPS_TRUNK:
            raise ValueError(f"lpips net={net!r}: use one of {sorted(_LPIPS_TRUNK)} (the protocol uses 'alex')")
        import lpips

        # pnet_rand=True: build the trunk without torchvision's download; real weights are loaded below.
        # use_dropout stays True: the shipped heads are stored as `lin<k>.model.1.weight` (after the dropout) and
        # lpips loads them with strict=False, so use_dropout=False would silently leave the heads random.
        # Dropout is inert because this module never leaves eval mode.
        self.lpips = lpips.LPIPS(net=net, pnet_rand=True, use_dropout=True, verbose=False)
        if not random_trunk:
            weights = find_weights(_LPIPS_TRUNK[net], trunk_path, verify=verify)
            self._load_trunk(torch.load(weights, map_location="cpu", weights_only=True))
        self.requires_grad_(False)
        self.eval()

    def _load_trunk(self, tv_state: dict[str, torch.Tensor]) -> None:
        # torchvision keys `features.<i>.<p>` -> lpips slices `slice<k>.<i>.<p>` (the slices keep the indices).
        own = self.lpips.net.state_dict()
        index_to_key = {k.split(".", 1)[1]: k for k in own}  # "<i>.<p>" -> "slice<k>.<i>.<p>"
        mapped = {index_to_key[k[len("features.") :]]: v for k, v in tv_state.items() if k.startswith("features.")}
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"LPIPS trunk file lacks {missing[:3]}...: is it the torchvision {self.lpips.pnet_type}?")
        self.lpips.net.load_state_dict(mapped, strict=True)

    @torch.no_grad()
    def forward(self, x01: torch.Tensor, x_hat01: torch.Tensor) -> torch.Tensor:
        d = self.lpips(x01.float(), x_hat01.float(), normalize=True)  # (B, 1, 1, 1)
        return d.reshape(-1)


# Inception-v3 for FID -----------------------------------------------------------------------------------
class InceptionFeatures(Frozen):
    """pool3 (2048-d) features of the FID Inception-v3, preprocessed as pytorch-fid and the DC-AE evaluator:
    uint8 / 255 -> bilinear resize to 299 (align_corners=False, no antialias) -> [-1, 1].

    The network graph is torch-fidelity's port of the TF Inception (the same weights file as pytorch-fid);
    only its layers are used, not its TF1-style resize.
    """

    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, verify: bool = True) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        weights = find_weights(INCEPTION, weights_path, verify=verify)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights)
        self.requires_grad_(False)
        self.eval()

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


class TinyFeatures(Frozen):
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
        self.requires_grad_(False)

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
