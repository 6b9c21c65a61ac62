"""Export a `DCAE` for others: a diffusers `AutoencoderDC` folder, or the original efficientvit/DC-Gen layout.

Safetensors only, never pickles. Our full config also goes into the safetensors metadata (`dcae_config`), so
`load_model` reads our exports back without guessing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dcae_train.data.shards import write_atomic
from dcae_train.models import DCAE, DCAEConfig
from dcae_train.weights.io import CONFIG_NAME, WEIGHTS_NAME, write_safetensors
from dcae_train.weights.loading import META_CONFIG, ORIGINAL_NAME, _match_variant
from dcae_train.weights.original import diffusers_to_original

DIFFUSERS_VERSION = "0.40.0.dev0"  # written as `_diffusers_version`; any version >= 0.35 reads these keys
DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def export_diffusers(
    model: DCAE,
    out_dir: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    scaling_factor: float | None = None,
) -> Path:
    """Write `config.json` + `diffusion_pytorch_model[.bf16|.fp16].safetensors` for `AutoencoderDC.from_pretrained`.

    `dtype` None/fp32 writes the plain file; bf16/fp16 write the diffusers `variant` file (load it with
    `from_pretrained(dir, variant="bf16")`). `scaling_factor` overrides the model's (e.g. measured after training).
    """
    torch_dtype = _resolve_dtype(dtype)
    config = _config_with_factor(model, scaling_factor)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # An earlier export into this folder (another dtype, or sharded) must not leave weight files beside ours:
    # a loader could pick the stale ones. Only files of a diffusers export are removed.
    for stale in [*out.glob(f"{WEIGHTS_NAME}*.safetensors"), *out.glob(f"{WEIGHTS_NAME}*.safetensors.index.json")]:
        stale.unlink()
    cfg = {"_class_name": "AutoencoderDC", "_diffusers_version": DIFFUSERS_VERSION, **config.to_diffusers_config()}
    write_atomic(out / CONFIG_NAME, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    variant = {torch.float32: "", torch.bfloat16: ".bf16", torch.float16: ".fp16"}[torch_dtype]
    write_safetensors(
        _cast(model.state_dict(), torch_dtype),
        out / f"{WEIGHTS_NAME}{variant}.safetensors",
        _our_metadata(model, config),
    )
    return out


def export_original(model: DCAE, path: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write the efficientvit/DC-Gen layout. `path` ending in `.safetensors`: that file only; otherwise a folder
    with `model.safetensors` and `config.json` `{"model_name": <variant or null>, "dcae_config": {...}}`."""
    torch_dtype = _resolve_dtype(dtype)
    config = model.config
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        info = {"model_name": _variant_name(model), META_CONFIG: config.to_dict()}
        write_atomic(path / CONFIG_NAME, (json.dumps(info, indent=2) + "\n").encode())
        path = path / ORIGINAL_NAME
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tensors = diffusers_to_original(_cast(model.state_dict(), torch_dtype), config)
    write_safetensors(tensors, path, _our_metadata(model, config))
    return path


# Helpers -----------------------------------------------------------------------------------------------
def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype={dtype}: use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Integer buffers (BatchNorm num_batches_tracked) keep their dtype: strict loading needs them as int64.
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _config_with_factor(model: DCAE, scaling_factor: float | None) -> DCAEConfig:
    if not isinstance(model, DCAE):
        raise ValueError(f"expected a dcae_train DCAE, got {type(model).__name__}; load it with load_model()")
    if scaling_factor is None:
        return model.config
    if not scaling_factor > 0:
        raise ValueError(f"scaling_factor={scaling_factor}: must be > 0 (about 1 / RMS of the latents)")
    return model.config.replace(scaling_factor=float(scaling_factor))


def _variant_name(model: DCAE) -> str | None:
    return model.variant or _match_variant(model.config)


def _our_metadata(model: DCAE, config: DCAEConfig) -> dict[str, str]:
    return {META_CONFIG: json.dumps({"config": config.to_dict(), "variant": _variant_name(model)})}
