"""Reading and writing weight files: safetensors (single, `.variant`, sharded with an index), diffusers folders.

Every failure is a `WeightsError` naming the file and the problem. Nothing here unpickles anything: safetensors
holds tensors only (our `.ckpt` files are read by `checkpoint.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_NAME = "config.json"


class WeightsError(ValueError):
    """A weight file or folder that cannot be loaded; the message names the file and the fix."""


# safetensors ----------------------------------------------------------------------------------------------
def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of one safetensors file (on CPU) and its metadata; a clear error if corrupt or truncated."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise WeightsError(
            f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); it is corrupt, truncated or "
            f"another format. Download or export it again."
        ) from err
    return tensors, meta


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Contiguous CPU copies (safetensors refuses shared or strided storage), written with `metadata`."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={"format": "pt", **metadata})


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err}); fix or remove the file") from err
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


# diffusers folders ------------------------------------------------------------------------------------------
def find_diffusers_weights(folder: Path, variant: str | None = None) -> list[Path]:
    """The weight files of a diffusers model folder: single file, then sharded index; fp32 before variants.

    `variant=None` tries the plain file first, then `bf16` and `fp16` variants.
    """
    variants = [variant] if variant else [None, "bf16", "fp16"]
    for v in variants:
        dot = f".{v}" if v else ""
        single = folder / f"{WEIGHTS_NAME}{dot}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{WEIGHTS_NAME}.safetensors.index{dot}.json"
        if index.is_file():
            return _shards_from_index(index)
    pickles = sorted(p.name for p in folder.glob(f"{WEIGHTS_NAME}*.bin"))
    hint = f" Found only pickle files {pickles}: they are refused; convert them to safetensors." if pickles else ""
    raise WeightsError(
        f"{folder}: no {WEIGHTS_NAME}[.variant].safetensors and no sharded index "
        f"{WEIGHTS_NAME}.safetensors.index[.variant].json{f' for variant {variant!r}' if variant else ''}.{hint}"
    )


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise WeightsError(f"{index}: has no 'weight_map'; a sharded diffusers index maps every key to a shard")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise WeightsError(f"{index}: names shard(s) {missing} that are not in {index.parent}; download them too")
    return shards


def read_diffusers_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        tensors, _ = read_safetensors(f)
        dup = sorted(set(tensors) & set(sd))
        if dup:
            raise WeightsError(f"{f}: key {dup[0]} appears in more than one shard")
        sd.update(tensors)
    return sd
