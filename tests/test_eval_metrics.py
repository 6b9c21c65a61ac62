"""Our PSNR / SSIM / LPIPS / FID against torchmetrics on the same tensors (issue 6 acceptance)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

from dcae_train.evaluation.extractors import TinyFeatures
from dcae_train.evaluation.metrics import (
    FeatureStats,
    fid_from_stats,
    frechet_distance,
    psnr_per_image,
    ssim_per_image,
    to_uint8,
)
from dcae_train.losses import LPIPS
from dcae_train.pretrained import ALEXNET, weight_file


def _pair(b: int = 4, size: int = 64, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(b, 3, size, size, generator=gen) * 2 - 1
    x_hat = (x + noise * torch.randn(x.shape, generator=gen)).clamp(-1.2, 1.2)
    return to_uint8(x), to_uint8(x_hat)


def test_to_uint8_rounds_like_the_evaluator():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 255]


def test_psnr_matches_torchmetrics():
    u, v = _pair()
    ours = psnr_per_image(u, v).mean()
    ref = peak_signal_noise_ratio(v.float(), u.float(), data_range=255.0, dim=(1, 2, 3))
    assert abs(float(ours) - float(ref)) < 1e-4


@pytest.mark.parametrize("size", [64, 37])
def test_ssim_matches_torchmetrics(size):
    u, v = _pair(size=size, noise=0.2)
    ours = ssim_per_image(u, v).mean()
    ref = structural_similarity_index_measure(v.float(), u.float(), data_range=(0.0, 255.0))
    assert abs(float(ours) - float(ref)) < 1e-4


def test_ssim_of_identical_images_is_one():
    u, _ = _pair()
    assert torch.allclose(ssim_per_image(u, u), torch.ones(4), atol=1e-6)


@pytest.fixture
def random_alexnet_home(tmp_path, monkeypatch):
    """A random AlexNet under the official file name in a private TORCH_HOME: both libraries load it offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / ALEXNET.names[0])
    return ckpt


def test_lpips_matches_torchmetrics(random_alexnet_home):
    u, v = _pair()
    ours = LPIPS("alex", verify=False).distance(u.float() / 127.5 - 1, v.float() / 127.5 - 1).mean()
    tm = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    ref = tm(v.float() / 255, u.float() / 255)
    assert abs(float(ours) - float(ref)) < 1e-4


def test_missing_weights_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"alexnet-owt-7be5be79\.pth.*hub/checkpoints"):
        LPIPS("alex")


def test_wrong_weights_fail_the_checksum(random_alexnet_home):
    with pytest.raises(ValueError, match="SHA-256"):
        weight_file(ALEXNET)


def test_fid_matches_torchmetrics_with_the_same_features():
    gen = torch.Generator().manual_seed(2)
    real = (torch.rand(48, 3, 32, 32, generator=gen) * 255).to(torch.uint8)
    fake = (real.float() * 0.8 + 20 * torch.rand(real.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    feats = TinyFeatures(dim=16)
    tm = FrechetInceptionDistance(feature=feats, normalize=False)
    ours_real, ours_fake = FeatureStats(16), FeatureStats(16)
    for i in range(0, 48, 16):  # batches: the running sums must merge exactly
        tm.update(real[i : i + 16], real=True)
        tm.update(fake[i : i + 16], real=False)
        ours_real.update(feats(real[i : i + 16]))
        ours_fake.update(feats(fake[i : i + 16]))
    ref = float(tm.compute())
    assert ref > 0.01
    for method in ("eigh", "sqrtm"):
        assert abs(fid_from_stats(ours_real, ours_fake, method) - ref) < 1e-3, method


def test_eigh_and_sqrtm_traces_agree_on_large_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(600, 256)), rng.normal(size=(600, 256)) @ rng.normal(size=(256, 256)) * 0.1
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    fast, official = frechet_distance(*args, method="eigh"), frechet_distance(*args, method="sqrtm")
    assert abs(fast - official) < 1e-6 * abs(official)


def test_frechet_distance_of_identical_gaussians_is_zero():
    a = np.random.default_rng(0).normal(size=(100, 8))
    mu, cov = a.mean(0), np.cov(a, rowvar=False)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-6


def test_feature_stats_roundtrip(tmp_path):
    s = FeatureStats(4)
    s.update(torch.randn(10, 4))
    s.save(tmp_path / "s.npz")
    t = FeatureStats.load(tmp_path / "s.npz")
    assert t.n == 10 and np.allclose(t.outer, s.outer)
