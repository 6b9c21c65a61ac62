"""LPIPS (Zhang et al. 2018): the one wrapper behind the training loss and the evaluation metric.

The `lpips` package ships the learned linear heads; the ImageNet trunk (VGG16 or AlexNet) is a torchvision file
from the registry in `dcae_train.pretrained` (found under `$TORCH_HOME`, SHA-256 checked, downloaded only when
allowed). Frozen, always in eval, fp32 even under bf16 autocast; inputs are images in [-1, 1] (the metric maps
uint8 / 127.5 - 1, which equals torchmetrics' `normalize=True` on uint8 / 255).

Trunk policy of `LPIPS(net, pretrained=True, path=None, require_pretrained=True, allow_download=False)`:
  file found (at `path` or in the hub folder) -> verified (ValueError on a wrong hash) and loaded
  absent, allow_download -> downloaded (hash-checked); a failed download counts as absent
  absent                 -> require_pretrained: FileNotFoundError naming the file and the folder;
                            otherwise one loud warning and a random trunk (seeded: the same on every rank and run)
`pretrained=False` builds the random trunk and never touches the network or the cache (unit tests, smoke runs).
`.pretrained` says whether the ImageNet trunk was loaded; the trainer records it with the run.
"""

from __future__ import annotations

import logging
import os
import warnings

import lpips
import torch
from torch import nn

from dcae_train.pretrained import ALEXNET, VGG16, FrozenModule, WeightFile, weight_file

logger = logging.getLogger(__name__)

TRUNKS: dict[str, WeightFile] = {"vgg": VGG16, "alex": ALEXNET}  # the torchvision files lpips builds its trunks from
_NORM_EPS = 1e-10
_RANDOM_TRUNK_SEED = 0
_warned_random_trunk: set[str] = set()  # warn once per process and net, not once per LPIPS


class LPIPS(FrozenModule):
    """`forward(x_hat, x)`: the batch mean as a 0-dim fp32 tensor (the loss); `distance`: per image, (B,)."""

    def __init__(
        self,
        net: str = "vgg",
        *,
        pretrained: bool = True,
        path: str | os.PathLike | None = None,
        require_pretrained: bool = True,
        allow_download: bool = False,
        verify: bool = True,
        shapes_only: bool = False,
    ) -> None:
        """`shapes_only=True`: built inside the caller's FakeTensorMode, for FLOP and memory estimates
        (`dcae_train.cost`): no weight file is read and the per-process cache of real builds is not touched."""
        super().__init__()
        self.net_name = net
        # Resolve the trunk file first: a missing or corrupt file fails before the (slow) network build.
        want = pretrained and not shapes_only
        state = _trunk_state(net, path, require_pretrained, allow_download, verify) if want else None
        self.lpips = _construct_shapes(net) if shapes_only else _build_lpips(net)  # random trunk + linear heads
        if state is not None:
            self.lpips.net.load_state_dict(_to_slices(state, self.lpips.net), strict=True)
        self.pretrained = state is not None
        self.freeze()

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.distance(x_hat, x).mean()

    def distance(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-image LPIPS, (B,) fp32; gradients flow to both inputs."""
        _check_images(x_hat, x)
        # fp32 island: under bf16 the unit-normalisation and squared feature differences lose the signal.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._distance(x_hat.float(), x.float())

    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        lp = self.lpips
        feats_a = lp.net(lp.scaling_layer(a))  # 5 feature maps (B, C_k, H_k, W_k), relu1_2 ... relu5_3 for VGG
        feats_b = lp.net(lp.scaling_layer(b))
        total = a.new_zeros(a.shape[0])
        for fa, fb, lin in zip(feats_a, feats_b, lp.lins, strict=True):
            diff = (unit_normalize(fa) - unit_normalize(fb)).pow(2)  # (B, C_k, H_k, W_k)
            total = total + lin(diff).mean(dim=(1, 2, 3))  # learned channel weights, spatial mean -> (B,)
        return total


def unit_normalize(feat: torch.Tensor, eps: float = _NORM_EPS) -> torch.Tensor:
    """feat / ||feat||_2 over channels. eps sits inside the sqrt: lpips' sqrt(sum) + eps has an infinite gradient
    where a feature vector is all zero, the NaN source in latent-diffusion #176 / PerceptualSimilarity #69.
    (Hand-written for that reason: the package's own forward cannot be used for training.)"""
    return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + eps)


def _build_lpips(net: str) -> lpips.LPIPS:
    """The lpips network with the package's linear heads and the seeded random trunk.

    Built for real once per process and net, then copied: lpips constructs the whole torchvision model, whose
    classifier (discarded) costs ~1 s of random init for VGG16; the copy is built on the meta device and
    filled with the first build's tensors, so every build holds the same values as a real construction."""
    if net not in _CONSTRUCTED:
        _CONSTRUCTED[net] = {k: v.clone() for k, v in _construct(net).state_dict().items()}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore")  # the meta build's head loading and torchvision's deprecations
        lp = _construct(net)
    lp.to_empty(device="cpu")
    lp.load_state_dict(_CONSTRUCTED[net], strict=True)
    return lp


def _construct_shapes(net: str) -> lpips.LPIPS:
    """The network on the caller's fake tensors: the shapes of a real build, no values, no cache entry."""
    return _construct(net)


_CONSTRUCTED: dict[str, dict[str, torch.Tensor]] = {}  # net -> state_dict of the real, seeded construction


def _construct(net: str) -> lpips.LPIPS:
    # pnet_rand=True: lpips would otherwise let torchvision download the trunk, unverified; we load it ourselves.
    # The fixed seed makes the random trunk identical across ranks and runs without touching the global RNG.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(_RANDOM_TRUNK_SEED)
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        # use_dropout=True is required: the shipped linear heads are stored as `lin*.model.1.weight` (Dropout at
        # index 0) and lpips loads them with strict=False, so use_dropout=False silently leaves the heads random.
        # Dropout is inert: this module never leaves eval mode.
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, use_dropout=True, verbose=False)


def _trunk_state(net, path, require_pretrained: bool, allow_download: bool, verify: bool):
    """The verified torchvision state_dict of `net`'s ImageNet trunk, or None for a random trunk (module docstring)."""
    try:
        file = weight_file(TRUNKS[net], path, verify=verify, allow_download=allow_download)
    except FileNotFoundError as err:
        if require_pretrained:
            raise FileNotFoundError(
                f"LPIPS needs the pretrained {net} trunk: {err}. Or allow a random trunk with "
                "perceptual.require_pretrained=false (LPIPS values are then meaningless)."
            ) from None
        _warn_random_trunk(net, str(err))
        return None
    return torch.load(file, map_location="cpu", weights_only=True)


def _warn_random_trunk(net: str, reason: str) -> None:
    if net in _warned_random_trunk:
        return
    _warned_random_trunk.add(net)
    msg = f"LPIPS is using a RANDOM {net} trunk ({reason}). The perceptual loss is meaningless for real training."
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
    logger.warning(msg)


def _to_slices(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """torchvision `features.<i>.<param>` -> lpips `slice<k>.<i>.<param>` (lpips keeps torchvision's layer index)."""
    slice_of = {idx: name for name, sl in trunk.named_children() for idx in sl._modules}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in slice_of:
            out[".".join([slice_of[parts[1]], *parts[1:]])] = value
    return out


def _check_images(x_hat: torch.Tensor, x: torch.Tensor) -> None:
    if x_hat.shape != x.shape or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(
            f"LPIPS compares two RGB batches of the same shape (B, 3, H, W) in [-1, 1]; got {tuple(x_hat.shape)} "
            f"and {tuple(x.shape)}"
        )
