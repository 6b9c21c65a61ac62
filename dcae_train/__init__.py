"""dcae-train: the open training framework for DC-AE deep-compression autoencoders.

Public entry points (imported lazily so that `import dcae_train` stays cheap):

- `dcae_train.models`: `DCAEConfig`, `DCAE`, `build_model`, `VARIANTS`.
- `dcae_train.load_model(source, ema=True)`: a variant name, a diffusers directory, an original
  `.safetensors`, one of our checkpoints or a Hugging Face repo id -> `DCAE`.
- `dcae_train.export_diffusers(model, out_dir, dtype=None)`, `dcae_train.export_original(model, path)`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "DCAE": "dcae_train.models",
    "DCAEConfig": "dcae_train.models",
    "build_model": "dcae_train.models",
    "VARIANTS": "dcae_train.models",
    "load_model": "dcae_train.weights",
    "export_diffusers": "dcae_train.weights",
    "export_original": "dcae_train.weights",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcae_train' has no attribute {name!r}")
