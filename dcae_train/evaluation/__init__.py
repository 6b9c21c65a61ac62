"""Evaluation of DC-AE reconstructions with the official protocol: rFID, PSNR, SSIM, LPIPS, latent statistics.

- `config`: `EvaluationConfig` (evaluation during training).
- `metrics`: uint8 quantisation, PSNR, SSIM, Fréchet distance, running feature statistics.
- `extractors`: the FID Inception (weights from `$TORCH_HOME` or an explicit path, offline) and a tiny stand-in.
- `evaluator`: `ReconstructionEvaluator` (accumulate batches, merge ranks) and the `evaluate_model` loop.
- `data`: image folder / WebDataset shards with the ADM centre crop.
- `reference`: cached reference Inception statistics. `reports`: JSON, Markdown, worst-cases grid.
Lightning-free: the training callback that runs these metrics is `dcae_train.training.eval_callback`.
The protocol: docs/evaluation.md.
"""

from dcae_train.evaluation.config import EvaluationConfig
from dcae_train.evaluation.evaluator import ReconstructionEvaluator, compute_all, evaluate_model, prefix_latents
from dcae_train.evaluation.extractors import InceptionFeatures, TinyFeatures, build_feature_extractor
from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.evaluation.metrics import FeatureStats, frechet_distance, psnr_per_image, ssim_per_image, to_uint8

__all__ = [
    "EvaluationConfig",
    "FeatureStats",
    "InceptionFeatures",
    "LatentAccumulator",
    "ReconstructionEvaluator",
    "TinyFeatures",
    "build_feature_extractor",
    "compute_all",
    "evaluate_model",
    "frechet_distance",
    "prefix_latents",
    "psnr_per_image",
    "ssim_per_image",
    "to_uint8",
]
