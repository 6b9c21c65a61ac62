"""The frozen vision foundation model of the alignment losses: DINOv2 (Oquab et al. 2024) ViT-S/B/L/14, with or
without registers, as patch-feature maps on a chosen grid.

Built by timm, not transformers, because one library then builds every DINOv2 size with and without registers,
exposes the features of any block as (B, D, h, w) maps (`forward_intermediates`), converts Meta's own `.pth` files
(`checkpoint_filter_fn`) and reads timm's Hugging Face copies, and is a small dependency (VA-VAE uses it too).

Weights come through the registry (`dcae_train.pretrained.resolve_unpinned`): `foundation.path`, else Meta's file in
the torch hub folder, else timm's file in the local Hugging Face cache; nothing is downloaded. Missing weights are
an error naming the file and where to put it, unless random weights are allowed (`require_pretrained=false`:
one loud warning, seeded random weights, recorded with the run as `foundation_pretrained`).

Inputs are images in [-1, 1]; they are mapped to [0, 1], normalised with the ImageNet mean and std DINOv2 was
trained with, and resized (bicubic, antialiased) so the ViT's token grid is the requested grid. Frozen, eval, no
autograd graph (`torch.no_grad`); it runs under the caller's autocast (bf16 on GPU is fine for a frozen feature
extractor) and returns fp32 features.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily

from dcae_train.losses.config import FoundationConfig
from dcae_train.pretrained import DINOV2, FrozenModule, resolve_unpinned

logger = logging.getLogger(__name__)

# Our name -> timm architecture (timm's names for the same DINOv2 releases).
TIMM_ARCHS = {
    f"dinov2-vit{s}14{'-reg' if r else ''}": f"vit_{size}_patch14{'_reg4' if r else ''}_dinov2"
    for s, size in (("s", "small"), ("b", "base"), ("l", "large"))
    for r in (False, True)
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's training normalisation (its hubconf / timm pretrained_cfg)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH = 14
_RANDOM_SEED = 0
_warned: set[str] = set()


class FoundationModel(FrozenModule):
    """`forward(x, grid)`: (B, 3, H, W) in [-1, 1] -> (B, D, *grid) fp32 features of block `layer`."""

    def __init__(
        self,
        name: str = "dinov2-vitl14",
        *,
        pretrained: bool = True,
        path: str | os.PathLike | None = None,
        sha256: str | None = None,
        require_pretrained: bool = True,
        layer: int = -1,
        input_size: int | None = None,
        shapes_only: bool = False,
    ) -> None:
        """`shapes_only=True`: built inside the caller's FakeTensorMode for cost estimates (`dcae_train.cost`): the
        ViT's shapes without its values; no weight file is looked for."""
        super().__init__()
        if name not in TIMM_ARCHS:
            raise ValueError(f"foundation model {name!r} is not known; use one of {', '.join(TIMM_ARCHS)}")
        self.name, self.layer, self.input_size = name, layer, input_size
        want = pretrained and not shapes_only
        file, self.digest = _find_weights(name, path, sha256, require_pretrained) if want else (None, None)
        self.vit = _build_shapes(name) if shapes_only else _build(name)
        if file is not None:
            self.vit.load_state_dict(_read_state(file, self.vit), strict=True)
        self.pretrained = file is not None
        self.weights_file = str(file) if file is not None else None
        self.dim: int = self.vit.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        n = len(self.vit.blocks)
        if not -n <= layer < n:
            raise ValueError(f"foundation.layer={layer}: {name} has {n} blocks; use -{n}..{n - 1}")
        self.freeze()

    @classmethod
    def from_config(
        cls, cfg: FoundationConfig, *, pretrained: bool = True, shapes_only: bool = False
    ) -> FoundationModel:
        return cls(
            cfg.model, pretrained=pretrained, path=cfg.path, sha256=cfg.sha256,
            require_pretrained=cfg.require_pretrained, layer=cfg.layer, input_size=cfg.input_size,
            shapes_only=shapes_only,
        )  # fmt: skip

    @torch.no_grad()
    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        gh, gw = grid
        size = (gh * PATCH, gw * PATCH) if self.input_size is None else (self.input_size, self.input_size)
        (f,) = self.token_maps(x, size, [self.layer], norm=True)  # final norm, as VA-VAE's forward_features
        if f.shape[-2:] != (gh, gw):
            f = F.adaptive_avg_pool2d(f.float(), (gh, gw))  # input_size given: pool the tokens to the latent grid
        return f.float()  # (B, D, gh, gw)

    def token_maps(
        self, x: torch.Tensor, size: tuple[int, int], layers: list[int], *, norm: bool = False
    ) -> list[torch.Tensor]:
        """The patch tokens of blocks `layers` as (B, D, size/14) maps, differentiable in `x` (the weights stay
        frozen): the DINO discriminator backpropagates the generator's term through them."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"foundation model input must be RGB images (B, 3, H, W) in [-1, 1], got {tuple(x.shape)}")
        x = ((x.float() + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet-normalised
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)  # (B, 3, 14h, 14w)
        return self.vit.forward_intermediates(  # prefix tokens (CLS, registers) dropped
            x, indices=layers, norm=norm, output_fmt="NCHW", intermediates_only=True
        )  # [(B, D, h, w)]


def _build(name: str) -> nn.Module:
    import timm  # lazily: only runs with an alignment loss pay for the import

    # Seeded without touching the global RNG: the random fallback is the same on every rank and run.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        return timm.create_model(TIMM_ARCHS[name], pretrained=False, dynamic_img_size=True, num_classes=0)


def _build_shapes(name: str) -> nn.Module:
    """The ViT on the caller's fake tensors. timm's constructor reads Python floats out of a tensor (its drop-path
    rates, `.item()`), which fake tensors cannot give, so it is built on the meta device with the fake mode off
    (no values, no time) and its parameters and buffers are then made fake CPU tensors of the same shapes."""
    import timm

    with unset_fake_temporarily(), torch.device("meta"):
        vit = timm.create_model(TIMM_ARCHS[name], pretrained=False, dynamic_img_size=True, num_classes=0)
    for m in vit.modules():  # torch.empty under the caller's fake mode: a fake tensor (fake modes refuse meta inputs)
        for key, p in m._parameters.items():
            if p is not None:
                m._parameters[key] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
        for key, b in m._buffers.items():
            if b is not None:
                m._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return vit


def _find_weights(name: str, path, sha256: str | None, require_pretrained: bool):
    """(file, its SHA-256), or (None, None) for the random fallback (see the module docstring)."""
    try:
        return resolve_unpinned(DINOV2[name], path, sha256_pin=sha256)
    except FileNotFoundError as err:
        if require_pretrained:
            raise FileNotFoundError(
                f"the alignment losses need the pretrained {name}: {err}. Or allow random weights with "
                "foundation.require_pretrained=false (the alignment is then meaningless)."
            ) from None
        _warn_random(name, str(err))
        return None, None


def _read_state(file, vit: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn  # Meta's layout -> timm's (timm's is kept)

    if str(file).endswith(".safetensors"):
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    return checkpoint_filter_fn(state, vit)


def _warn_random(name: str, reason: str) -> None:
    if name in _warned:
        return
    _warned.add(name)
    msg = (
        f"the foundation model {name} has RANDOM weights ({reason}). What uses its features (the alignment losses, "
        "the DINO discriminator) is meaningless for real training."
    )
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
    logger.warning(msg)
