"""Tiled encode/decode: images of any size with peak memory bounded by the tile, not the image.

    z = tiled_encode(model, x, tile=512, overlap=128)     # x: (B, 3, H, W), any H, W -> (B, c, ceil(H/f), ceil(W/f))
    x_hat = tiled_decode(model, z, tile=512, overlap=128)  # (B, c, h, w) -> (B, 3, h*f, w*f)

Both sizes are in pixels and must be multiples of the compression ratio f; in latent space a tile is tile/f.

How (architecture.md section 5 for what diffusers does, and why seams appear):
- Tiles sit on a grid spread evenly over the image, so the first and last tile touch the borders and neighbours
  overlap by at least `overlap` (every overlap is the same size up to one latent).
- Each tile's output is weighted by a separable ramp that is 1 inside the tile and falls linearly to ~0 at an
  edge shared with a neighbour (never at the image border), and the sum is normalised by the summed weights.
  The tile edges, which lack context (attention sees only the tile), thus contribute least.
  Measured (scripts/bench_tiling.py, sana-1.1 at 1024 px): a zero-weight outer margin in each overlap (full and
  reduced widths) or a cosine ramp (width 0.25) raised the error; the largest decode error sits where one tile
  alone covers the image (a corner: every 512 px tile covering it is the same one), so no blending changes it.
- Only one tile's activations exist at a time. The result is accumulated in fp32 in place; no full-size weight
  map is made (the normalisation is separable too).
- Encode: an image that is not a multiple of f is padded (edge replicate, per tile, so the image is never
  copied) to the next multiple; crop the decoded image back to (H, W) (`reconstruct.py` does).

Run under `torch.no_grad()` / `torch.inference_mode()`: with autograd every tile's graph would be kept.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

DEFAULT_TILE = 512  # px: 16 latents at f32, as diffusers' default, so costs compare like for like
DEFAULT_OVERLAP = 128  # px: twice diffusers' 64 px blend; see scripts/bench_tiling.py for the seam error


class Autoencoder(Protocol):
    spatial_compression_ratio: int

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


# Public API ------------------------------------------------------------------------------------------------
def tiled_encode(
    model: Autoencoder, x: torch.Tensor, *, tile: int | None = None, overlap: int | None = None
) -> torch.Tensor:
    """(B, C, H, W) image of any size -> (B, c_lat, ceil(H/f), ceil(W/f)) latent, encoded tile by tile."""
    f = model.spatial_compression_ratio
    t, o = _check_sizes(f, tile, overlap)
    if x.ndim != 4:
        raise ValueError(f"tiled_encode: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = math.ceil(x.shape[2] / f), math.ceil(x.shape[3] / f)  # latent size after padding to f
    ys, xs = _starts(h, t, o), _starts(w, t, o)
    out: torch.Tensor | None = None
    th, tw = min(t, h), min(t, w)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            z = model.encode(_padded_crop(x, y0 * f, x0 * f, th * f, tw * f))  # (B, c_lat, th, tw)
            out = _accumulate(out, z, (i, j), (h, w), ys, xs, th, tw, 1)
    assert out is not None
    return _normalise(out, ys, xs, th, tw, 1, (h, w)).to(z.dtype)


def tiled_decode(
    model: Autoencoder, z: torch.Tensor, *, tile: int | None = None, overlap: int | None = None
) -> torch.Tensor:
    """(B, c_lat, h, w) latent -> (B, C, h*f, w*f) image, decoded in overlapping latent tiles of tile/f."""
    f = model.spatial_compression_ratio
    t, o = _check_sizes(f, tile, overlap)
    if z.ndim != 4:
        raise ValueError(f"tiled_decode: expected latents (B, c, h, w), got shape {tuple(z.shape)}")
    h, w = z.shape[2], z.shape[3]
    ys, xs = _starts(h, t, o), _starts(w, t, o)
    th, tw = min(t, h), min(t, w)
    out: torch.Tensor | None = None
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            x_hat = model.decode(z[:, :, y0 : y0 + th, x0 : x0 + tw])  # (B, C, th*f, tw*f)
            out = _accumulate(out, x_hat, (i, j), (h, w), ys, xs, th, tw, f)
    assert out is not None
    return _normalise(out, ys, xs, th, tw, f, (h, w)).to(x_hat.dtype)


# Tile grid -------------------------------------------------------------------------------------------------
def _check_sizes(f: int, tile: int | None, overlap: int | None) -> tuple[int, int]:
    """(tile, overlap) in latents, after checking the pixel values against the compression ratio f."""
    tile = DEFAULT_TILE if tile is None else int(tile)
    overlap = (DEFAULT_OVERLAP if tile >= 2 * DEFAULT_OVERLAP else tile // 4 // f * f) if overlap is None else overlap
    if tile < f or tile % f:
        raise ValueError(f"tile={tile}: must be a positive multiple of the compression ratio {f}, e.g. {max(f, 512)}")
    if overlap < 0 or overlap % f or overlap > tile // 2:
        raise ValueError(
            f"overlap={overlap}: must be a multiple of {f} between 0 and tile/2={tile // 2} (pixels), e.g. {tile // 4}"
        )
    return tile // f, overlap // f


def _starts(length: int, t: int, o: int) -> list[int]:
    """Start offsets (latents) of tiles of t spread evenly over `length`, neighbours overlapping by >= o."""
    if length <= t:
        return [0]
    n = math.ceil((length - o) / (t - o))
    return [round(i * (length - t) / (n - 1)) for i in range(n)]


def _ramp(starts: list[int], i: int, t: int, f: int, device: torch.device) -> torch.Tensor:
    """1-D weight (t*f,) of tile i: linear ramps over the overlaps with its neighbours, 1 elsewhere."""
    w = torch.ones(t * f, device=device)
    if i > 0:
        n = (starts[i - 1] + t - starts[i]) * f  # overlap with the previous tile, in output pixels
        if n > 0:
            w[:n] = torch.minimum(w[:n], (torch.arange(n, device=device) + 0.5) / n)
    if i < len(starts) - 1:
        n = (starts[i] + t - starts[i + 1]) * f
        if n > 0:
            w[-n:] = torch.minimum(w[-n:], 1 - (torch.arange(n, device=device) + 0.5) / n)
    return w


def _accumulate(out, part, ij, size, ys, xs, th, tw, f) -> torch.Tensor:
    """out[..., tile] += part * ramp_y x ramp_x, allocating out (fp32) on the first tile."""
    if out is None:
        b, c = part.shape[:2]
        out = torch.zeros(b, c, size[0] * f, size[1] * f, device=part.device, dtype=torch.float32)
    (i, j), y0, x0 = ij, ys[ij[0]], xs[ij[1]]
    wy = _ramp(ys, i, th, f, part.device)
    wx = _ramp(xs, j, tw, f, part.device)
    region = out[:, :, y0 * f : (y0 + th) * f, x0 * f : (x0 + tw) * f]
    region.add_(part.float() * wy[:, None] * wx[None, :])
    return out


def _normalise(out, ys, xs, th, tw, f, size) -> torch.Tensor:
    """Divide by the summed weights, separably (rows, then columns): no full-size weight map."""
    for starts, t, n, dim in ((ys, th, size[0], 2), (xs, tw, size[1], 3)):
        total = torch.zeros(n * f, device=out.device)
        for i, s in enumerate(starts):
            total[s * f : (s + t) * f] += _ramp(starts, i, t, f, out.device)
        shape = [1, 1, 1, 1]
        shape[dim] = -1
        out.div_(total.view(shape))
    return out


def _padded_crop(x: torch.Tensor, y0: int, x0: int, th: int, tw: int) -> torch.Tensor:
    """x[..., y0:y0+th, x0:x0+tw], edge-replicated where it runs past the image (only the tile is copied)."""
    crop = x[:, :, y0 : y0 + th, x0 : x0 + tw]
    pad_h, pad_w = th - crop.shape[2], tw - crop.shape[3]
    if pad_h or pad_w:
        crop = F.pad(crop, (0, pad_w, 0, pad_h), mode="replicate")
    return crop
