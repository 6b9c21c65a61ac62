"""The registry of pretrained weight files we load but never train: LPIPS trunks, the FID Inception, and the
foundation-model backbones (DINOv2). One place finds, verifies and (when allowed) downloads them.

- Where: an explicit path, else `$TORCH_HOME/hub/checkpoints/<name>` (default `~/.cache/torch`), the folder
  torch.hub and torchvision use, so files already cached by them are found.
- Verified: the SHA-256 must start with the prefix in the official file name (`vgg16-397923af.pth`). torch.hub
  checks it only while downloading, so a wrong or truncated file would otherwise load silently.
- Downloaded only when the caller allows it (training recipes may; evaluation and tests never do).
- Missing: `FileNotFoundError` naming the file, the folder and the URL to fetch it from on a machine with network.

Unpinned files (`sha256_prefix=""`: the DINOv2 backbones, whose publishers give no digest) are never downloaded
and are verified by what is known: a SHA-256 the user pins, else a Hugging Face cache blob's content address (the
blob's file name is the SHA-256 of the file); `resolve_unpinned` returns the digest so the run can record it.

`FrozenModule` is the base of every network built from these files: eval mode forever, no gradients, fp32.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, try_to_load_from_cache
from torch import nn


@dataclass(frozen=True)
class WeightFile:
    names: tuple[str, ...]  # accepted file names in the hub folder, preferred (and downloaded) first
    sha256_prefix: str
    url: str
    what: str
    hf_repo: str = ""  # Hugging Face repo holding the same weights (found in the local HF cache, never fetched)
    hf_file: str = "model.safetensors"  # the file in that repo


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


def _dinov2(size: str, registers: bool) -> WeightFile:
    """Meta's DINOv2 backbone file (torch.hub caches it under this name) and timm's copy on the Hugging Face hub.
    No digest is published for either, so the entry is unpinned (see `resolve_unpinned`)."""
    reg = "_reg4" if registers else ""
    arch = {"s": "small", "b": "base", "l": "large"}[size]
    return WeightFile(
        (f"dinov2_vit{size}14{reg}_pretrain.pth",),
        "",
        f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/dinov2_vit{size}14{reg}_pretrain.pth",
        f"DINOv2 ViT-{size.upper()}/14{' with registers' if registers else ''}",
        hf_repo=f"timm/vit_{arch}_patch14{reg}_dinov2.lvd142m",
    )


DINOV2 = {f"dinov2-vit{s}14{'-reg' if r else ''}": _dinov2(s, r) for s in "sbl" for r in (False, True)}


_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: re-verifying is free


def hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # honours $TORCH_HOME and torch.hub.set_dir()


def weight_file(spec: WeightFile, path: str | os.PathLike | None = None, *, verify: bool = True,
                allow_download: bool = False) -> Path:  # fmt: skip
    """The verified file of `spec`: `path` if given, else the first of `spec.names` in the hub folder, else a
    download into it (`allow_download`). FileNotFoundError when it is missing; ValueError when it is not the file."""
    assert spec.sha256_prefix, f"{spec.what} has no pinned digest: use resolve_unpinned"
    found = _locate(spec, path)
    if found is None:
        if not allow_download:
            raise FileNotFoundError(_missing(spec, "downloading is disabled"))
        found = _download(spec)
    if verify:
        check_sha256(found, spec)
    return found


def resolve_unpinned(spec: WeightFile, path: str | os.PathLike | None = None, *,
                     sha256_pin: str | None = None) -> tuple[Path, str]:  # fmt: skip
    """(file, its SHA-256) of a registry entry without a pinned digest: `path` if given, else the first of
    `spec.names` in the hub folder, else `spec.hf_file` of `spec.hf_repo` in the local Hugging Face cache. Never
    downloads. `sha256_pin` (a full digest or a prefix of >= 8 hex digits) is checked when given; a Hugging Face
    cache blob is always checked against its content address. FileNotFoundError naming the file and the folders
    when it is missing; ValueError when the file is not the one expected."""
    found = _locate(spec, path) or _hf_cached(spec)
    if found is None:
        raise FileNotFoundError(_missing_unpinned(spec))
    digest = sha256(found)
    blob = found.resolve().name
    if re.fullmatch(r"[0-9a-f]{64}", blob) and blob != digest:  # an HF cache blob is named by its SHA-256
        raise ValueError(
            f"{found} is corrupt: the Hugging Face cache names it {blob[:12]}... but its SHA-256 is {digest[:12]}...; "
            f"delete it and fetch {spec.hf_repo} again (huggingface-cli download {spec.hf_repo} {spec.hf_file})"
        )
    if sha256_pin and not digest.startswith(sha256_pin.lower()):
        raise ValueError(
            f"{found} is not the pinned {spec.what} file: its SHA-256 is {digest}, the pin is {sha256_pin}. Fetch the "
            "file again or correct the pin"
        )
    return found, digest


def _hf_cached(spec: WeightFile) -> Path | None:
    if not spec.hf_repo:
        return None
    hit = try_to_load_from_cache(spec.hf_repo, spec.hf_file)  # honours $HF_HUB_CACHE; reads the cache only
    return Path(hit) if isinstance(hit, str) and Path(hit).is_file() else None


def _missing_unpinned(spec: WeightFile) -> str:
    hf = (
        f", or into the Hugging Face cache with `huggingface-cli download {spec.hf_repo} {spec.hf_file}`"
        if spec.hf_repo
        else ""
    )
    return (
        f"{spec.what} weights {spec.names[0]} are not in {hub_dir()} (nor {spec.hf_repo or 'any repo'} in the Hugging "
        f"Face cache {constants.HF_HUB_CACHE}). This machine "
        f"does not download them: copy {spec.url} into that folder{hf} on a machine with network, or pass the "
        "file's path"
    )


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
