"""Tiled encode/decode: images of any size with peak memory bounded by the tile, not the image.

    z = tiled_encode(model, x, tile=512, overlap=128)     # x: (B, 3, H, W), any H, W -> (B, c, ceil(H/f), ceil(W/f))
    x_hat = tiled_decode(model, z, tile=512, overlap=128)  # (B, c, h, w) -> (B, 3, h*f, w*f)

Both sizes are in pixels and must be multiples of the compression ratio f; in latent space a tile is tile/f.

How (docs/tiling.md: what diffusers does, and why seams appear):
- Tiles sit on a grid spread evenly over the image, so the first and last tile touch the borders and neighbours
  overlap by at least `overlap` (every overlap is the same size up to one latent).
- Each tile's output is weighted by a separable ramp that is 1 inside the tile and falls linearly to ~0 at an
  edge shared with a neighbour (never at the image border), and the sum is normalised by the summed weights.
  The tile edges, which lack context (attention sees only the tile), thus contribute least.
  Measured (scripts/bench_tiling.py, sana-1.1 at 1024 px): a zero-weight outer margin in each overlap (full and
  reduced widths) or a cosine ramp (width 0.25) raised the error; the largest decode error sits where one tile
  alone covers the image (a corner: every 512 px tile covering it is the same one), so no blending changes it.
- Attention over the whole image (`global_attention`, on by default for decode): DC-AE's ReLU linear attention
  is global, so a tile that attends only within itself misses context; that, not the blending, made most of the
  error (and the max sits where one tile alone covers the image). `GlobalAttention` gathers each layer's
  whole-image sums over the tiles first, layer by layer; then every tile attends with them. sana-1.1 at
  1024 px, quarter width: decode max error 0.64 -> 0.086, mean 0.070 -> 0.0037, for 1.4x the time. What is left
  comes from the convolutions at the tile edges, which the blending softens.
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

from dcae_train.models.blocks import MultiscaleLinearAttention

DEFAULT_TILE = 512  # px: 16 latents at f32, as diffusers' default, so costs compare like for like
DEFAULT_OVERLAP = 128  # px: twice diffusers' 64 px blend; see scripts/bench_tiling.py for the seam error


class Autoencoder(Protocol):
    spatial_compression_ratio: int

    def encode(self, x: torch.Tensor, latent_channels: int | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...


# Public API ------------------------------------------------------------------------------------------------
def tiled_encode(
    model: Autoencoder,
    x: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    global_attention: bool = False,
    latent_channels: int | None = None,
) -> torch.Tensor:
    """(B, C, H, W) image of any size -> (B, c_lat, ceil(H/f), ceil(W/f)) latent, encoded tile by tile
    (`latent_channels=c`: the first c channels, on variants that take prefixes).

    global_attention=True gives every tile the whole image's attention sums (see the module doc); off by default
    here because the encoder's attention comes after its costly high-resolution stages, which each gathering pass
    reruns (about 8x the time for sana-1.1).
    """
    f = model.spatial_compression_ratio
    t, o = _check_sizes(f, tile, overlap)
    if x.ndim != 4:
        raise ValueError(f"tiled_encode: expected images (B, C, H, W), got shape {tuple(x.shape)}")
    h, w = math.ceil(x.shape[2] / f), math.ceil(x.shape[3] / f)  # latent size after padding to f
    ys, xs = _starts(h, t, o), _starts(w, t, o)
    th, tw = min(t, h), min(t, w)

    def run(y0: int, x0: int) -> torch.Tensor:
        crop = _padded_crop(x, y0 * f, x0 * f, th * f, tw * f)
        if latent_channels is None:  # any object with encode(x) tiles; only prefix-capable models take the argument
            return model.encode(crop)  # (B, c_lat, th, tw)
        return model.encode(crop, latent_channels=latent_channels)  # (B, c, th, tw)

    return _run_tiles(model, run, ys, xs, th, tw, 1, (h, w), global_attention)


def tiled_decode(
    model: Autoencoder,
    z: torch.Tensor,
    *,
    tile: int | None = None,
    overlap: int | None = None,
    global_attention: bool = True,
) -> torch.Tensor:
    """(B, c_lat, h, w) latent -> (B, C, h*f, w*f) image, decoded in overlapping latent tiles of tile/f.

    global_attention=True (default): every tile attends with the whole latent's attention sums, gathered first
    in passes that stop at each attention layer (cheap: the decoder's attention runs at low resolution, before
    its costly stages); False: each tile attends within itself only, as diffusers does.
    """
    f = model.spatial_compression_ratio
    t, o = _check_sizes(f, tile, overlap)
    if z.ndim != 4:
        raise ValueError(f"tiled_decode: expected latents (B, c, h, w), got shape {tuple(z.shape)}")
    h, w = z.shape[2], z.shape[3]
    ys, xs = _starts(h, t, o), _starts(w, t, o)
    th, tw = min(t, h), min(t, w)

    def run(y0: int, x0: int) -> torch.Tensor:
        return model.decode(z[:, :, y0 : y0 + th, x0 : x0 + tw])  # (B, C, th*f, tw*f)

    return _run_tiles(model, run, ys, xs, th, tw, f, (h, w), global_attention)


def _run_tiles(model, run, ys, xs, th, tw, f, size, global_attention: bool) -> torch.Tensor:
    """Blend run(y0, x0) over the grid; with global attention, first gather the sums layer by layer."""
    modules = _attention_modules(model) if global_attention and len(ys) * len(xs) > 1 else []
    if not modules:
        out = _blend(lambda i, j: run(ys[i], xs[j]), ys, xs, th, tw, f, size)
        assert out is not None
        return out
    ctx = GlobalAttention(_cores(ys, th, size[0]), _cores(xs, tw, size[1]), (th, tw))
    for m in modules:
        m.tile_context = ctx
    try:
        while True:  # one pass per attention layer, in the order the forward meets them, then the real one
            ctx.start_pass()
            out = _blend(ctx.tile_runner(run, ys, xs), ys, xs, th, tw, f, size)
            if not ctx.end_pass():
                assert out is not None
                return out
    finally:
        for m in modules:
            m.tile_context = None


def _blend(run, ys, xs, th, tw, f, size) -> torch.Tensor | None:
    """sum over tiles (i, j) of run(i, j) x its ramps, normalised; None when every tile stopped early."""
    out: torch.Tensor | None = None
    part: torch.Tensor | None = None
    for i in range(len(ys)):
        for j in range(len(xs)):
            part = run(i, j)
            if part is None:  # a gathering pass: the tile stopped at the attention layer being gathered
                continue
            out = _accumulate(out, part, (i, j), size, ys, xs, th, tw, f)
    if out is None:
        return None
    assert part is not None
    return _normalise(out, ys, xs, th, tw, f, size).to(part.dtype)


# Global attention over tiles -------------------------------------------------------------------------------
class _StopTile(Exception):
    """Raised inside the forward once the layer being gathered has seen the tile: the rest is not needed."""


class _TileRunner:
    def __init__(self, ctx: GlobalAttention, run, ys, xs) -> None:
        self.ctx, self.run, self.ys, self.xs = ctx, run, ys, xs

    def __call__(self, i: int, j: int) -> torch.Tensor | None:
        self.ctx.core = (*self.ctx.cores_y[i], *self.ctx.cores_x[j])
        self.ctx.origin = (self.ys[i], self.xs[j])
        try:
            return self.run(self.ys[i], self.xs[j])
        except _StopTile:
            return None


class GlobalAttention:
    """Exact whole-image ReLU linear attention for tiled encode/decode.

    The attention of a layer needs, per head, only S = sum_n v_n k_n^T (d x d) and s = sum_n k_n (d) over all
    pixels n: out_n = S q_n / (s . q_n + eps). Untiled, the sums run over the whole image; a tile alone sums
    over itself, which is the missing context behind most of the tiling error (and the colour shifts between
    tiles of real DC-AE decodes). Here the sums are gathered layer by layer: a pass over all tiles runs each
    tile up to the first layer still without sums, adds that layer's k and v over the tile's core (the tile's
    share of a partition of the image, so every pixel counts once; the core lies inside the tile's overlap
    margins, so the local convs that feed k and v see their real neighbours there), then stops the tile. Later
    layers use the finished sums. A last pass decodes with all sums. Memory: one tile's activations plus
    2 x heads x d x (d + 1) floats per layer.
    """

    def __init__(self, cores_y, cores_x, tile_hw: tuple[int, int]) -> None:
        self.cores_y, self.cores_x, self.tile_hw = cores_y, cores_x, tile_hw
        self.sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.core: tuple[int, int, int, int] = (0, 0, 0, 0)  # latent rows y0:y1, cols x0:x1 of the current tile
        self.origin = (0, 0)
        self.target: int | None = None
        self.acc: list[torch.Tensor] | None = None

    def start_pass(self) -> None:
        self.target, self.acc = None, None

    def end_pass(self) -> bool:
        """Store the gathered layer's sums; False when the pass ran every layer (its output is the result)."""
        if self.target is None:
            return False
        assert self.acc is not None
        self.sums[self.target] = (self.acc[0], self.acc[1])
        return True

    def tile_runner(self, run, ys, xs) -> _TileRunner:
        return _TileRunner(self, run, ys, xs)

    def attend(self, module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hw) -> torch.Tensor:
        """q, k (after ReLU), v: (B, G, d, N) fp32 of the current tile at this layer's resolution hw."""
        key = id(module)
        if key in self.sums:
            vk, ks = self.sums[key]
            return (vk @ q) / (ks.transpose(-1, -2) @ q + module.eps)  # (B, G, d, N)
        if self.target is None:
            self.target = key
        if self.target != key:  # cannot happen in a feed-forward model: the forward order is fixed
            raise RuntimeError("tiled global attention: attention layers ran in a different order across tiles")
        (h, w), (th, tw) = hw, self.tile_hw
        if h % th or w % tw:
            raise RuntimeError(f"tiled global attention: layer resolution {hw} is not a multiple of the tile {th, tw}")
        sy, sx = h // th, w // tw
        y0, y1, x0, x1 = self.core
        oy, ox = self.origin
        rows = slice((y0 - oy) * sy, (y1 - oy) * sy)
        cols = slice((x0 - ox) * sx, (x1 - ox) * sx)
        kc = k.unflatten(-1, (h, w))[..., rows, cols].flatten(-2)  # (B, G, d, n_core)
        vc = v.unflatten(-1, (h, w))[..., rows, cols].flatten(-2)
        part = [vc @ kc.transpose(-1, -2), kc.sum(dim=-1, keepdim=True)]  # (B, G, d, d), (B, G, d, 1)
        self.acc = part if self.acc is None else [a + p for a, p in zip(self.acc, part, strict=True)]
        raise _StopTile


def _attention_modules(model: Autoencoder) -> list[MultiscaleLinearAttention]:
    if not isinstance(model, torch.nn.Module):  # any object with encode/decode tiles; only ours has these layers
        return []
    return [m for m in model.modules() if isinstance(m, MultiscaleLinearAttention)]


def _cores(starts: list[int], t: int, length: int) -> list[tuple[int, int]]:
    """Partition [0, length) among the tiles: each boundary at the middle of the overlap of two neighbours."""
    bounds = [0] + [(starts[i + 1] + starts[i] + t) // 2 for i in range(len(starts) - 1)] + [length]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


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
