"""Evaluation of DC-AE reconstructions with the official protocol: rFID, PSNR, SSIM, LPIPS, latent statistics.

- `metrics`: uint8 quantisation, PSNR, SSIM, Fréchet distance, running feature statistics.
- `extractors`: LPIPS and the FID Inception, weights from `$TORCH_HOME` or explicit paths (offline).
- `evaluator`: `ReconstructionEvaluator` (accumulate batches, merge ranks) and the `evaluate_model` loop.
- `data`: image folder / WebDataset shards with the ADM centre crop.
- `reference`: cached reference Inception statistics. `reports`: JSON, Markdown, worst-cases grid.
- `callback`: `EvalCallback` for training (imported lazily: it needs Lightning).
"""

from __future__ import annotations

import importlib
from typing import Any

from dcae_train.evaluation.evaluator import ReconstructionEvaluator, evaluate_model
from dcae_train.evaluation.extractors import InceptionFeatures, LPIPSMetric, TinyFeatures, build_feature_extractor
from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.evaluation.metrics import FeatureStats, frechet_distance, psnr_per_image, ssim_per_image, to_uint8

__all__ = [
    "EvalCallback",
    "FeatureStats",
    "InceptionFeatures",
    "LPIPSMetric",
    "LatentAccumulator",
    "ReconstructionEvaluator",
    "TinyFeatures",
    "build_feature_extractor",
    "evaluate_model",
    "frechet_distance",
    "psnr_per_image",
    "ssim_per_image",
    "to_uint8",
]


def __getattr__(name: str) -> Any:
    if name == "EvalCallback":
        return importlib.import_module("dcae_train.evaluation.callback").EvalCallback
    raise AttributeError(f"module 'dcae_train.evaluation' has no attribute {name!r}")
