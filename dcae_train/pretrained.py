"""The registry of pretrained weight files we load but never train: LPIPS trunks, the FID Inception, and the
foundation-model backbones to come. One place finds, verifies and (when allowed) downloads them.

- Where: an explicit path, else `$TORCH_HOME/hub/checkpoints/<name>` (default `~/.cache/torch`), the folder
  torch.hub and torchvision use, so files already cached by them are found.
- Verified: the SHA-256 must start with the prefix in the official file name (`vgg16-397923af.pth`). torch.hub
  checks it only while downloading, so a wrong or truncated file would otherwise load silently.
- Downloaded only when the caller allows it (training recipes may; evaluation and tests never do).
- Missing: `FileNotFoundError` naming the file, the folder and the URL to fetch it from on a machine with network.

`FrozenModule` is the base of every network built from these files: eval mode forever, no gradients, fp32.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class WeightFile:
    names: tuple[str, ...]  # accepted file names in the hub folder, preferred (and downloaded) first
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

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: re-verifying is free


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # honours $TORCH_HOME and torch.hub.set_dir()


def weight_file(spec: WeightFile, path: str | os.PathLike | None = None, *, verify: bool = True,
                allow_download: bool = False) -> Path:  # fmt: skip
    """The verified file of `spec`: `path` if given, else the first of `spec.names` in the hub folder, else a
    download into it (`allow_download`). FileNotFoundError when it is missing; ValueError when it is not the file."""
    found = _locate(spec, path)
    if found is None:
        if not allow_download:
            raise FileNotFoundError(_missing(spec, "downloading is disabled"))
        found = _download(spec)
    if verify:
        check_sha256(found, spec)
    return found


def _locate(spec: WeightFile, path: str | os.PathLike | None) -> Path | None:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"{spec.what} weights not found at {path}: place {spec.names[0]} there ({spec.url})"
            )
        return Path(path)
    return next((hub_dir() / n for n in spec.names if (hub_dir() / n).is_file()), None)


def _download(spec: WeightFile) -> Path:
    target = hub_dir() / spec.names[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # torch.hub writes to a temporary file and renames it: a killed download leaves nothing behind
        torch.hub.download_url_to_file(spec.url, str(target), hash_prefix=spec.sha256_prefix, progress=False)
    except OSError as err:  # URLError, timeouts, DNS: an offline machine; a hash mismatch (RuntimeError) propagates
        raise FileNotFoundError(_missing(spec, f"downloading {spec.url} failed ({type(err).__name__}: {err})")) from err
    return target


def _missing(spec: WeightFile, reason: str) -> str:
    return (
        f"{spec.what} weights {spec.names[0]} are not in {hub_dir()} and {reason}. Copy {spec.url} (SHA-256 starts "
        f"with {spec.sha256_prefix}) into that folder on a machine with network (it follows $TORCH_HOME: "
        "<TORCH_HOME>/hub/checkpoints/), or pass the file's path"
    )


def check_sha256(path: Path, spec: WeightFile) -> None:
    digest = sha256(path)
    if not digest.startswith(spec.sha256_prefix):
        raise ValueError(
            f"{path} is not the {spec.what} file: its SHA-256 starts with {digest[:8]}, expected "
            f"{spec.sha256_prefix}. Delete it and fetch {spec.url} again (or skip the check for a deliberately "
            "different file)"
        )


def sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]


class FrozenModule(nn.Module):
    """A network we never train: eval mode even when Lightning calls `.train()`, no gradients for its weights,
    and an fp32 island even when a bf16-true trainer casts every submodule."""

    def freeze(self) -> None:
        super().requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> FrozenModule:
        return super().requires_grad_(False)  # never in an optimizer or DDP's all-reduce

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for t in (*self.parameters(), *self.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return self
