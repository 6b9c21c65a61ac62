"""Tiled encode/decode: exact where it must be, padding and cropping, bounded tiles, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dcae_train.models import build_model
from dcae_train.tiling import tiled_decode, tiled_encode


class LocalAE:
    """A per-latent (receptive field = one latent) autoencoder: tiling must reproduce it exactly.

    Records the largest input it was given, to show that memory is bounded by the tile.
    """

    spatial_compression_ratio = 8

    def __init__(self) -> None:
        self.largest = 0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, x.shape[2] * x.shape[3])
        return F.avg_pool2d(x, 8).repeat(1, 2, 1, 1) * 1.5  # (B, 6, H/8, W/8)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.largest = max(self.largest, z.shape[2] * z.shape[3] * 64)
        return F.interpolate(z[:, :3] - z[:, 3:] + z[:, :3], scale_factor=8, mode="nearest")


@pytest.mark.parametrize(("h", "w"), [(64, 64), (200, 136), (101, 77), (512, 40)])
@pytest.mark.parametrize("overlap", [0, 16, 32])
def test_local_model_is_reproduced_exactly_with_padding(h, w, overlap):
    ae = LocalAE()
    x = torch.rand(2, 3, h, w) * 2 - 1
    z = tiled_encode(ae, x, tile=64, overlap=overlap)
    hp, wp = -(-h // 8) * 8, -(-w // 8) * 8
    padded = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate")  # what untiled encode of the padded image sees
    torch.testing.assert_close(z, LocalAE().encode(padded), rtol=0, atol=1e-5)
    torch.testing.assert_close(tiled_decode(ae, z, tile=64, overlap=overlap), LocalAE().decode(z), rtol=0, atol=1e-5)
    assert ae.largest <= 64 * 64  # never more than one tile at a time


def test_single_tile_equals_untiled_exactly():
    model = build_model("tiny").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(model.tiled_encode(x, tile=64), z)
        assert torch.equal(model.tiled_decode(z, tile=64), model.decode(z))


def test_real_model_odd_sizes_and_seams_stay_small():
    model = build_model("tiny-in").eval()
    x = torch.rand(1, 3, 36, 70) * 2 - 1
    with torch.no_grad():
        z = model.tiled_encode(x, tile=32, overlap=8)
        assert z.shape == (1, 8, 5, 9)  # ceil(36/8), ceil(70/8)
        x_hat = model.tiled_decode(z, tile=32, overlap=8)
        assert x_hat.shape == (1, 3, 40, 72)
        assert torch.isfinite(x_hat).all()
        full = model.decode(z)
        assert (x_hat - full).abs().mean() < 0.5 * full.abs().mean()


def test_default_arguments_and_validation():
    ae = LocalAE()
    z = tiled_encode(ae, torch.zeros(1, 3, 1000, 24))  # defaults: tile 512, overlap 128
    assert z.shape == (1, 6, 125, 3)
    with pytest.raises(ValueError, match="tile=100: must be a positive multiple of the compression ratio 8"):
        tiled_decode(ae, z, tile=100)
    with pytest.raises(ValueError, match=r"overlap=40: must be a multiple of 8 between 0 and tile/2=32"):
        tiled_decode(ae, z, tile=64, overlap=40)
    with pytest.raises(ValueError, match="expected latents"):
        tiled_decode(ae, torch.zeros(6, 4, 4))
