"""Reconstruction metrics of the official DC-AE protocol (docs/evaluation.md), as plain functions.

Every metric works on uint8-quantised images: both the reference and the reconstruction are rounded to
uint8 first, exactly as the authors' evaluator does, so a model is never rewarded for sub-quantum detail.
`to_uint8` is the package's one quantiser (the training grids and validation PSNR use it too). SSIM is
torchmetrics'; PSNR is ours (see `psnr_per_image`); LPIPS is `dcae_train.losses.LPIPS`, Inception features come
from `extractors.py`; the Fréchet distance between two feature Gaussians is `frechet_distance`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

# PSNR of a perfect reconstruction is infinite; clamping the MSE keeps means finite (148 dB cap).
_MIN_MSE = 1e-10


# Quantisation -------------------------------------------------------------------------------------------
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8: clamp(255 * (x + 1) / 2 + 0.5, 0, 255), truncated."""
    return (255.0 * (x.float() + 1.0) / 2.0 + 0.5).clamp(0, 255).to(torch.uint8)


def check_images(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} has shape {tuple(x.shape)}: expected (B, 3, H, W) images")


# PSNR ---------------------------------------------------------------------------------------------------
def psnr_per_image(x_u8: torch.Tensor, x_hat_u8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 pairs -> (B,) PSNR in dB, 10 * log10(255^2 / MSE) per image, in float64.

    Hand-written rather than torchmetrics': a perfect reconstruction gives torchmetrics an infinite PSNR, and one
    such image makes a dataset mean infinite; the MSE floor here caps it at 148 dB."""
    diff = x_u8.to(torch.float64) - x_hat_u8.to(torch.float64)
    mse = diff.pow(2).mean(dim=(1, 2, 3)).clamp_min(_MIN_MSE)  # (B,)
    return (10.0 * torch.log10(255.0**2 / mse)).float()


# SSIM ---------------------------------------------------------------------------------------------------
def ssim_per_image(x_u8: torch.Tensor, x_hat_u8: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 pairs -> (B,) SSIM: torchmetrics with data range 255 and its defaults (Gaussian
    window sigma 1.5, k1 0.01, k2 0.03) on float32 copies of the uint8 images, as the official evaluator."""
    pad = 5  # half the 11-tap window: torchmetrics reflect-pads by it
    if min(x_u8.shape[-2:]) <= pad:
        raise ValueError(f"images of size {tuple(x_u8.shape[-2:])} are too small for SSIM (need > {pad} px per side)")
    return structural_similarity_index_measure(
        x_hat_u8.float(), x_u8.float(), data_range=(0.0, 255.0), reduction="none"
    )


# Fréchet distance ---------------------------------------------------------------------------------------
def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, method: str = "eigh"
) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)).

    method="sqrtm": scipy's matrix square root, as pytorch-fid and the official evaluator (a 1e-6 ridge when
    the product is singular). method="eigh" (default): the same trace from two symmetric eigen-decompositions,
    Tr sqrt(S1 S2) = sum sqrt(eig(A S2 A)) with A = S1^(1/2), since S1 S2 and A S2 A share their eigenvalues;
    exact for covariance matrices and ~10-20x faster at 2048 dims (the Schur form dominates sqrtm).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature statistics differ in size: {mu1.shape} vs {mu2.shape}; same extractor?")
    if method not in ("eigh", "sqrtm"):
        raise ValueError(f"frechet_distance method={method!r}: use 'eigh' or 'sqrtm'")
    diff = mu1 - mu2
    trace_sqrt = _trace_sqrt_eigh(sigma1, sigma2) if method == "eigh" else _trace_sqrt_scipy(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def _trace_sqrt_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^(1/2); round-off negatives clipped
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.linalg.eigvalsh((m + m.T) / 2).clip(min=0)).sum())


def _trace_sqrt_scipy(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    with warnings.catch_warnings():
        # Fewer images than feature dims give singular covariances; scipy warns, the result is still usable,
        # and a non-finite one gets the ridge below (as pytorch-fid).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            ridge = np.eye(sigma1.shape[0]) * 1e-6
            covmean = scipy.linalg.sqrtm((sigma1 + ridge) @ (sigma2 + ridge))
    return float(np.trace(np.real(covmean)))  # sqrtm of a product of PSD matrices: imaginary part is round-off


@dataclass
class FeatureStats:
    """Running mean and covariance of feature vectors as float64 sums, so batches and ranks merge exactly.

    The sums stay on the features' device (a 2048 x 2048 outer-product sum per batch; copying it to the host
    every batch made GPU evaluation 3x slower than torchmetrics); numpy only at `mean_cov`.
    """

    dim: int
    n: int = 0
    total: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (d,) sum of features
    outer: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (d, d) sum of f f^T

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.dim, dtype=torch.float64)
        if self.outer is None:
            self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().reshape(features.shape[0], -1).double()  # (B, d)
        if f.shape[1] != self.dim:
            raise ValueError(f"features have {f.shape[1]} dims, the statistics {self.dim}")
        if self.total.device != f.device:
            self.total, self.outer = self.total.to(f.device), self.outer.to(f.device)
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer.addmm_(f.T, f)  # (d, d) += f^T f

    def cpu(self) -> FeatureStats:
        return FeatureStats(self.dim, self.n, self.total.cpu(), self.outer.cpu())

    def merge(self, other: FeatureStats) -> None:
        self.n += other.n
        self.total += other.total.to(self.total.device)
        self.outer += other.outer.to(self.outer.device)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.n}")
        total, outer = self.total.cpu().numpy(), self.outer.cpu().numpy()
        mu = total / self.n
        cov = (outer - self.n * np.outer(mu, mu)) / (self.n - 1)  # unbiased, as numpy.cov
        return mu, cov

    def save(self, path: Path, meta: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        mu, cov = self.mean_cov()
        tmp = path.with_suffix(".tmp.npz")
        total, outer = self.total.cpu().numpy(), self.outer.cpu().numpy()
        np.savez(tmp, mu=mu, sigma=cov, n=self.n, total=total, outer=outer, meta=str(meta or {}))
        tmp.replace(path)  # atomic: a crashed run never leaves a half-written cache entry

    @classmethod
    def load(cls, path: Path) -> FeatureStats:
        with np.load(path) as f:
            total, outer = torch.from_numpy(f["total"]), torch.from_numpy(f["outer"])
            return cls(dim=total.shape[0], n=int(f["n"]), total=total, outer=outer)


def fid_from_stats(real: FeatureStats, fake: FeatureStats, method: str = "eigh") -> float:
    mu_r, s_r = real.mean_cov()
    mu_f, s_f = fake.mean_cov()
    return frechet_distance(mu_r, s_r, mu_f, s_f, method)
