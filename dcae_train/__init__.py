"""dcae-train: the open training framework for DC-AE deep-compression autoencoders.

Public entry points:

- `dcae_train.models`: `DCAEConfig`, `DCAE`, `build_model`, `VARIANTS`.
- `dcae_train.load_model(source, ema=True)`: a variant name, a diffusers directory, an original
  `.safetensors`, one of our checkpoints or a Hugging Face repo id -> `DCAE`.
- `dcae_train.export_diffusers(model, out_dir, dtype=None)`, `dcae_train.export_original(model, path)`.
- `python -m dcae_train`: training (`dcae_train.cli`); `python -m dcae_train.evaluate`, `.latent_stats`,
  `.export`, `.reconstruct`, `.encode_dataset` (latent shards for diffusion training): the tools.
"""

from dcae_train.models import DCAE, VARIANTS, DCAEConfig, build_model
from dcae_train.weights import export_diffusers, export_original, load_model

__version__ = "0.1.0"

__all__ = [
    "DCAE",
    "VARIANTS",
    "DCAEConfig",
    "__version__",
    "build_model",
    "export_diffusers",
    "export_original",
    "load_model",
]
