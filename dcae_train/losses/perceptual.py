"""LPIPS perceptual loss (Zhang et al. 2018) around the `lpips` package: frozen, always eval, fp32, offline-safe.

The `lpips` package ships the learned linear heads; the ImageNet trunk (VGG16 or AlexNet) is a torchvision file in
the torch.hub cache, `$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`). torch.hub checks
the hash only while downloading, so a wrong or truncated file would load silently: we verify the SHA-256 against
the prefix in the file name (`vgg16-397923af.pth` -> `397923af`) every time we load it.

Trunk policy (`PerceptualLoss(pretrained=True, require_pretrained=..., allow_download=...)`):
  file present           -> verify the hash (RuntimeError on mismatch) and load it
  absent, allow_download -> download it with torch.hub (hash-checked); on failure treat it as absent
  absent, no download    -> require_pretrained: RuntimeError naming the file and the folder to put it in;
                            otherwise one loud warning and a random trunk (seeded: the same on every rank and run)
`pretrained=False` always builds the random trunk and never touches the network or the cache (unit tests).
`.pretrained` says whether the ImageNet trunk was loaded; the trainer records it with the run.
"""

from __future__ import annotations

import hashlib
import logging
import re
import warnings
from pathlib import Path

import lpips
import torch
from torch import nn
from torchvision.models import AlexNet_Weights, VGG16_Weights

logger = logging.getLogger(__name__)

# The torchvision ImageNet weights the lpips package builds its trunks from (lpips/pretrained_networks.py).
TRUNK_WEIGHTS = {"vgg": VGG16_Weights.IMAGENET1K_V1, "alex": AlexNet_Weights.IMAGENET1K_V1}
_NORM_EPS = 1e-10
_RANDOM_TRUNK_SEED = 0
_warned_random_trunk: set[str] = set()  # warn once per process and net, not once per PerceptualLoss
_verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, so re-building is cheap


class PerceptualLoss(nn.Module):
    """LPIPS distance between images in [-1, 1]; `forward(x_hat, x)` returns the batch mean as a 0-dim fp32 tensor."""

    def __init__(
        self,
        net: str = "vgg",
        pretrained: bool = True,
        *,
        require_pretrained: bool = True,
        allow_download: bool = True,
    ) -> None:
        super().__init__()
        if net not in TRUNK_WEIGHTS:
            raise ValueError(f"lpips_net={net!r} is not supported; use one of {', '.join(TRUNK_WEIGHTS)}")
        self.net_name = net
        # Resolve the trunk file first: a missing or corrupt file fails before the (slow) network build.
        state = _trunk_state_dict(net, require_pretrained, allow_download) if pretrained else None
        self.lpips = _build_lpips(net)  # random trunk + the package's linear heads
        if state is not None:
            self.lpips.net.load_state_dict(_to_slices(state, self.lpips.net), strict=True)
        self.pretrained = state is not None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        return super().train(False)  # fixed metric net: stay in eval even when Lightning calls .train()

    def requires_grad_(self, requires_grad: bool = True) -> PerceptualLoss:
        return super().requires_grad_(False)  # never trained, never in an optimizer or DDP's all-reduce

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Stay an fp32 island even when a bf16-true trainer casts every submodule with .to(torch.bfloat16).
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self

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
    where a feature vector is all zero, the NaN source in latent-diffusion #176 / PerceptualSimilarity #69."""
    return feat * torch.rsqrt(feat.pow(2).sum(dim=1, keepdim=True) + eps)


def trunk_file(net: str) -> Path:
    """Where torch.hub keeps (and we look for) the trunk weights of `net`: <torch.hub dir>/checkpoints/<name>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(TRUNK_WEIGHTS[net].url).name


def verify_trunk_file(path: Path) -> None:
    """Raise RuntimeError unless the file's SHA-256 starts with the hex prefix in its name (torchvision's scheme)."""
    expected = re.search(r"-([0-9a-f]{8,})\.", path.name)
    assert expected is not None, f"no hash prefix in {path.name}"  # our own table of torchvision file names
    digest = _sha256(path)
    if not digest.startswith(expected.group(1)):
        raise RuntimeError(
            f"LPIPS trunk weights {path} are corrupt or not the torchvision ImageNet file: SHA-256 starts with "
            f"{digest[:8]}, expected {expected.group(1)}. Delete the file and let it download again, or replace it "
            f"with a verified copy of {_url_for(path.name)}."
        )


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _verified[key] = h.hexdigest()
    return _verified[key]


def _url_for(file_name: str) -> str:
    return next(w.url for w in TRUNK_WEIGHTS.values() if w.url.endswith("/" + file_name))


def _build_lpips(net: str) -> lpips.LPIPS:
    # pnet_rand=True: lpips would otherwise let torchvision download the trunk, unverified; we load it ourselves.
    # The fixed seed makes the random trunk identical across ranks and runs without touching the global RNG.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(_RANDOM_TRUNK_SEED)
        warnings.filterwarnings("ignore", message="The parameter 'pretrained' is deprecated")
        warnings.filterwarnings("ignore", message="Arguments other than a weight enum")
        # use_dropout=True is required: the shipped linear heads are stored as `lin*.model.1.weight` (Dropout at
        # index 0) and lpips loads them with strict=False, so use_dropout=False silently leaves the heads random.
        # Dropout is inert: this module never leaves eval mode (see train()).
        return lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, use_dropout=True, verbose=False)


def _trunk_state_dict(net: str, require_pretrained: bool, allow_download: bool) -> dict[str, torch.Tensor] | None:
    """The verified torchvision state_dict of `net`'s ImageNet trunk, or None for a random trunk (module docstring)."""
    path = trunk_file(net)
    if not path.is_file():
        reason = _download(net, path) if allow_download else "downloading is disabled (allow_download=False)"
        if reason is not None:
            _handle_missing(net, path, reason, require_pretrained)
            return None
    verify_trunk_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _download(net: str, path: Path) -> str | None:
    """Fetch the trunk into `path` (hash-checked by torch.hub); None on success, else why it failed."""
    url = TRUNK_WEIGHTS[net].url
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = re.search(r"-([0-9a-f]{8,})\.", path.name).group(1)  # type: ignore[union-attr]
    try:
        torch.hub.download_url_to_file(url, str(path), hash_prefix=prefix, progress=False)
    except OSError as e:  # URLError, timeouts, DNS: offline machines; a hash mismatch (RuntimeError) propagates
        return f"downloading {url} failed ({type(e).__name__}: {e})"
    return None


def _handle_missing(net: str, path: Path, reason: str, require_pretrained: bool) -> None:
    url = TRUNK_WEIGHTS[net].url
    if require_pretrained:
        raise RuntimeError(
            f"LPIPS needs the pretrained {net} trunk weights {path.name} in {path.parent}, but the file is absent "
            f"and {reason}. Copy {url} (SHA-256 starts with {path.name.split('-')[-1].split('.')[0]}) into "
            f"{path.parent}/ (the folder follows $TORCH_HOME: <TORCH_HOME>/hub/checkpoints/), or allow a "
            "random trunk with require_pretrained=False (perceptual.require_pretrained=false; LPIPS values are "
            "then meaningless)."
        )
    if net in _warned_random_trunk:
        return
    _warned_random_trunk.add(net)
    msg = (
        f"LPIPS is using a RANDOM {net} trunk: {path.name} is not in {path.parent} and {reason}. The perceptual "
        f"loss is meaningless for real training; place {url} in {path.parent}/ to fix this."
    )
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
