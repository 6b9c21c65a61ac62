"""Weights in and out: `load_model` (variant, diffusers folder, original checkpoint, our checkpoint, HF repo id),
`export_diffusers`, `export_original`, and the pure original <-> diffusers key conversion.

Files: `io.py` (safetensors and diffusers folders, with clear errors), `checkpoint.py` (our training checkpoints:
the safe loader and their metadata), `original.py` (key mapping), `loading.py` (`load_model`), `exporting.py`
(`export_diffusers`, `export_original`). Formats and pitfalls: docs/weights.md.
"""

from dcae_train.weights.exporting import export_diffusers, export_original
from dcae_train.weights.io import WeightsError
from dcae_train.weights.loading import load_model
from dcae_train.weights.original import ConversionError, diffusers_to_original, original_to_diffusers

__all__ = [
    "load_model",
    "export_diffusers",
    "export_original",
    "original_to_diffusers",
    "diffusers_to_original",
    "WeightsError",
    "ConversionError",
]
