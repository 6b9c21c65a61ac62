"""latent_stats recovers a planted latent scale; the CLI writes JSON and a diffusers config (issue 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.latent_stats import compute_latent_stats, run
from dcae_train.models import build_model
from dcae_train.weights import export_diffusers, load_model


class ScaledEncoder(nn.Module):
    """Wraps a model so that its latents are multiplied by a known constant."""

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        self.model, self.scale = model, scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x) * self.scale


class SignEncoder(nn.Module):
    """Latents are exactly +-scale: RMS = scale, so the recommended factor must be 1/scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.nn.functional.pixel_unshuffle(x, 4)  # (B, 48, H/4, W/4)
        return torch.where(z >= 0, 1.0, -1.0) * self.scale


def _batches(n: int = 3, b: int = 4, size: int = 32):
    gen = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(b, 3, size, size, generator=gen) * 2 - 1} for _ in range(n)]


def test_recovers_planted_scale_exactly():
    stats = compute_latent_stats(SignEncoder(2.5), _batches(), torch.device("cpu"))
    assert stats["rms"] == pytest.approx(2.5, rel=1e-9)
    assert stats["scaling_factor"] == pytest.approx(0.4, rel=1e-9)


def test_scaling_a_tiny_model_scales_the_factor():
    torch.manual_seed(0)
    model = build_model("tiny")
    base = compute_latent_stats(model, _batches(), torch.device("cpu"))
    scaled = compute_latent_stats(ScaledEncoder(model, 3.0), _batches(), torch.device("cpu"))
    assert scaled["rms"] == pytest.approx(3.0 * base["rms"], rel=1e-5)
    assert scaled["scaling_factor"] == pytest.approx(base["scaling_factor"] / 3.0, rel=1e-5)
    assert np.allclose(scaled["per_channel_std"], 3.0 * np.array(base["per_channel_std"]), rtol=1e-4)
    assert len(base["per_channel_mean"]) == model.latent_channels


def test_accumulator_matches_torch_statistics():
    z = torch.randn(6, 4, 5, 7) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(1, 4, 1, 1) + 0.3
    acc = LatentAccumulator(4)
    for part in z.split(2):
        acc.update(part)
    s = acc.summary()
    zc = z.permute(1, 0, 2, 3).reshape(4, -1).double()
    assert np.allclose(s["per_channel_mean"], zc.mean(1).numpy(), atol=1e-10)
    assert np.allclose(s["per_channel_std"], zc.std(1, unbiased=False).numpy(), atol=1e-10)
    assert s["rms"] == pytest.approx(float(z.double().pow(2).mean().sqrt()), rel=1e-12)
    with pytest.raises(ValueError, match="expected"):
        acc.update(torch.zeros(1, 3, 2, 2))


def test_cli_writes_json_and_config(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    torch.manual_seed(0)
    export = export_diffusers(build_model("tiny"), tmp_path / "export")  # a real diffusers folder, via load_model
    out = tmp_path / "stats.json"
    stats = run(["--model", str(export), "--data", str(images), "--resolution", "32", "--batch-size", "2",
                  "--num-workers", "0", "--no-progress", "--out", str(out), "--write-config", str(export)])  # fmt: skip
    written = json.loads(out.read_text())
    assert written["scaling_factor"] == pytest.approx(1 / written["rms"])
    assert written["model_scaling_factor"] == 1.0  # tiny's default, before the write
    assert json.loads((export / "config.json").read_text())["scaling_factor"] == stats["scaling_factor"]
    assert load_model(export).scaling_factor == pytest.approx(stats["scaling_factor"])
    with pytest.raises(ValueError, match="no config.json"):
        run(["--model", "tiny", "--random-init", "--data", str(images), "--write-config", str(tmp_path / "none")])


def test_write_config_through_a_symlink_keeps_the_link(tmp_path):
    """A Hub cache snapshot links its files: the scaling factor goes into the link's target, the link stays."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "0.png")
    export = export_diffusers(build_model("tiny"), tmp_path / "export")
    blob = tmp_path / "blobs" / "abc123"
    blob.parent.mkdir()
    (export / "config.json").rename(blob)
    (export / "config.json").symlink_to(blob)
    stats = run(["--model", "tiny", "--random-init", "--data", str(images), "--resolution", "32", "--num-workers",
                 "0", "--no-progress", "--out", str(tmp_path / "s.json"), "--write-config", str(export)])  # fmt: skip
    assert (export / "config.json").is_symlink()
    assert json.loads(blob.read_text())["scaling_factor"] == stats["scaling_factor"]
