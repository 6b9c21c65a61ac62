"""A phase-3 discriminator others can continue from: `discriminator.safetensors` + `discriminator.json` beside an
autoencoder export (`python -m dcae_train.export CKPT OUT --with-discriminator`), read back by a phase-3 run with
`init_discriminator=<that folder, the .safetensors file, or one of our .ckpt files>`.

discriminator.json: {"format": "dcae-train-discriminator", "version": 1, "type": "patch", "layers", "width", "norm",
"recipe", "step", "source", "lecam": {"ema_real", "ema_fake"} or null}. The architecture keys must equal the run's
`phases.p3.loss.disc`, so a discriminator is never loaded into a differently shaped one. Both files are written
atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcae_train.weights.checkpoint import read_training_checkpoint
from dcae_train.weights.io import WeightsError, read_json, read_safetensors, write_safetensors

WEIGHTS_FILE = "discriminator.safetensors"
CONFIG_FILE = "discriminator.json"
FORMAT = "dcae-train-discriminator"
# What must match the run's discriminator, per type
ARCH_KEYS = {"patch": ("layers", "width", "norm"), "dino": ("width", "norm", "trunk", "trunk_layers", "input_size")}
TRUNK_PREFIX = "trunk."  # the DINO discriminator's frozen trunk: never saved, it comes from its weight file
_PREFIX, _LECAM = "loss.discriminator.", "loss.lecam."


def export_discriminator(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write the discriminator of our training checkpoint `ckpt_path` into `out_dir`; returns the weights file."""
    state, info = _from_checkpoint(Path(ckpt_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    write_safetensors(state, tmp, {"dcae_discriminator": json.dumps(info)})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out / WEIGHTS_FILE


def read_discriminator(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, info) from an export folder, its discriminator.safetensors, or one of our .ckpt files."""
    path = Path(path)
    if path.suffix == ".ckpt":
        return _from_checkpoint(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_FILE
    if not weights.is_file() or not (folder / CONFIG_FILE).is_file():
        raise WeightsError(
            f"init_discriminator={path}: expected {WEIGHTS_FILE} and {CONFIG_FILE} there (written by "
            "`python -m dcae_train.export CKPT OUT --with-discriminator`) or a phase-3 .ckpt"
        )
    info = read_json(folder / CONFIG_FILE)
    if info.get("format") != FORMAT:
        raise WeightsError(
            f"{folder / CONFIG_FILE}: not a dcae-train discriminator config (format={info.get('format')})"
        )
    state, _ = read_safetensors(weights)
    return state, info


def check_architecture(info: dict[str, Any], want: dict[str, Any], source: str) -> None:
    """ValueError naming the first architecture key where the file and the run's discriminator differ."""
    for key in ("type", *ARCH_KEYS.get(str(want.get("type")), ())):
        if info.get(key, "patch" if key == "type" else None) != want.get(key):
            raise ValueError(
                f"init_discriminator={source} holds a {key}={info.get(key)!r} discriminator but this run builds "
                f"{key}={want.get(key)!r}; set phases.p3.loss.disc.{key}={info.get(key)!r} (or the discriminator "
                "type) to match the file"
            )


def load_discriminator_state(disc: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load of everything but the frozen trunk (which the run built from its own weight file)."""
    missing, unexpected = disc.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(TRUNK_PREFIX)]
    if missing or unexpected:
        raise WeightsError(
            f"init_discriminator={source}: keys do not match the run's discriminator (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); export it again from a checkpoint of the same architecture"
        )


def _from_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    ckpt, meta = read_training_checkpoint(path)
    sd = ckpt["state_dict"]
    state = {
        k[len(_PREFIX) :]: v
        for k, v in sd.items()
        if k.startswith(_PREFIX) and not k.startswith(_PREFIX + TRUNK_PREFIX)
    }
    if not state or meta.discriminator is None:
        raise WeightsError(
            f"{path}: holds no discriminator (phase-3 checkpoints with loss.gan > 0 do, written by this version)"
        )
    lecam = {k[len(_LECAM) :]: float(v) for k, v in sd.items() if k.startswith(_LECAM)} or None
    info = {"format": FORMAT, "version": 1, **meta.discriminator, "recipe": meta.recipe, "step": meta.step}
    return state, {**info, "source": str(path), "lecam": lecam}
