"""Our training checkpoints: the one safe loader, and the `dcae` metadata every checkpoint carries.

A checkpoint is Lightning's dict (`state_dict` with `model.*`, `ema.*`, `loss.discriminator.*`; optimizers,
schedulers, `global_step`, callbacks) plus `ckpt["dcae"]` = `CheckpointMeta.to_dict()` and `ckpt["dcae_rng"]`.
The trainer writes the metadata (`AutoencoderModule.on_save_checkpoint`); `load_model`, resume and the next
phase read it back here. Every read goes through `load_checkpoint`: `torch.load(weights_only=True)`, so a file
crafted to run code on unpickling is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dcae_train.models import DCAEConfig
from dcae_train.weights.io import WeightsError

META_KEY = "dcae"
RNG_KEY = "dcae_rng"


@dataclass
class CheckpointMeta:
    config: dict[str, Any]  # DCAEConfig.to_dict() of the model
    variant: str | None  # registered variant name, None for a custom architecture
    scaling_factor: float  # latent scaling factor (diffusers convention)
    phase: int  # 1 | 2 | 3
    recipe: str
    parent: str | None  # the checkpoint or weights this phase started from (init_from)
    lpips_pretrained: bool  # False when LPIPS ran on a random trunk (quickstart offline)
    # the alignment losses' foundation model: {model, pretrained, sha256, file}; None without one
    foundation: dict[str, Any] | None = None
    # the discriminator's architecture {type, layers, width, norm} and where its weights started (init_from)
    discriminator: dict[str, Any] | None = None
    step: int = 0  # autoencoder updates so far (= Lightning's global_step)
    nonfinite_total: int = 0  # skipped non-finite steps so far
    trainable: list[str] | None = None  # the phase's `trainable` globs (None in checkpoints from before they were kept)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "checkpoint") -> CheckpointMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as err:
            raise WeightsError(f"{where}: ckpt['{META_KEY}'] lacks a field ({err})") from err

    def model_config(self) -> DCAEConfig:
        return DCAEConfig.from_dict(self.config).replace(scaling_factor=float(self.scaling_factor))


def load_checkpoint(path: str | Path, *, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)`, with one clear error for every way it can fail."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # UnpicklingError, RuntimeError (bad zip), EOFError, ... depending on the damage
        first = str(err).splitlines()[0] if str(err) else ""
        raise WeightsError(
            f"{path}: refused or unreadable ({type(err).__name__}: {first}). Checkpoints are loaded with "
            "weights_only=True, so files that are truncated, corrupt or hold arbitrary Python objects fail here."
        ) from err


def read_training_checkpoint(path: str | Path, *, mmap: bool = False) -> tuple[dict[str, Any], CheckpointMeta]:
    """One of our Lightning `.ckpt` files and its metadata (tensors memory-mapped with `mmap=True`: cheap)."""
    ckpt = load_checkpoint(path, mmap=mmap)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or META_KEY not in ckpt:
        raise WeightsError(
            f"{path}: not a dcae-train checkpoint (needs 'state_dict' and '{META_KEY}' entries); for diffusers or "
            "original weights pass a folder or a .safetensors file"
        )
    return ckpt, CheckpointMeta.from_dict(ckpt[META_KEY], str(path))
