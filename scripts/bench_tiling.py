"""Tiled encode/decode: our `dcae_train.tiling` against diffusers' `AutoencoderDC` tiling, same weights, same tile.

    python scripts/bench_tiling.py                      # CPU: quarter width (--width-a 1 for the full model)
    python scripts/bench_tiling.py --device cuda        # GPU: full sana-1.1 for both parts

(a) Seam error: max / mean |tiled - untiled| of encode (latent) and decode (image) at `--size-a` px
    (default 1024), for both tilings at tile `--tile` (diffusers: its stride 448 px = tile - 64 px blend; ours
    with per-tile attention and with the whole image's attention sums, `global_attention`), and
    the seam jump: the largest step of the decode error field between neighbouring pixels (what makes a seam
    visible; a smooth error has none).
    Also where each max lies, and our max over the pixels that one of our tiles covers alone (there the tile's
    own error, from its missing context, is the result: blending and overlap cannot lower it).
(b) Memory and time of a tiled decode of a `--size-b` px image (default 4096, a 128 x 128 latent), next to the
    peak of decoding one tile alone. Peak = allocator high-water mark above the weights + input (CUDA), or the
    process's peak RSS above its RSS before the call (CPU; each measurement in a fresh process).
    "peak - output" subtracts the bytes of the returned image, which any method must hold.

Random weights (seeded); the image is a smooth synthetic scene, not noise. Medians over `--repeats`, ours and
diffusers interleaved in the same loop so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from dcae_train.models import DCAE, variant_config
from dcae_train.models.tiling import DEFAULT_OVERLAP, _starts, tiled_decode, tiled_encode

VARIANT = "dc-ae-f32c32-sana-1.1"
DIFFUSERS_BLEND = 64  # px: diffusers' default tile 512 / stride 448


def build_pair(width: float, device: str, dtype: torch.dtype):
    """Our DCAE and diffusers' AutoencoderDC holding the same random weights."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    config = variant_config(VARIANT)
    config = config if width == 1 else config.scaled(width)
    ours = DCAE(config).eval()
    theirs = AutoencoderDC(**config.to_diffusers_config()).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours.to(device, dtype), theirs.to(device, dtype)


def scene(size: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """(1, 3, size, size) in [-1, 1]: gradients, a few waves, a disc (deterministic)."""
    t = torch.linspace(0, 1, size, device=device)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r = 0.8 * xx - 0.3 + 0.2 * torch.sin(12 * yy)
    g = 0.6 * yy - 0.2 + 0.3 * torch.cos(9 * xx * yy)
    b = torch.where((xx - 0.6) ** 2 + (yy - 0.4) ** 2 < 0.05, 0.7, -0.5) + 0.1 * torch.sin(40 * xx)
    return torch.stack([r, g, b])[None].clamp(-1, 1).to(dtype)


def diffusers_tiling(model, tile: int) -> None:
    model.enable_tiling(tile, tile, tile - DIFFUSERS_BLEND, tile - DIFFUSERS_BLEND)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# (a) seam error -----------------------------------------------------------------------------------------------
@torch.no_grad()
def seam_error(args) -> tuple[list[tuple[str, float, float, float, float]], list[str]]:
    ours, theirs = build_pair(args.width_a, args.device, args.dtype)
    x = scene(args.size_a, args.device, args.dtype)
    z = ours.encode(x)
    x_hat = ours.decode(z)
    diffusers_tiling(theirs, args.tile)

    def stats(a, b):
        d = (a.float() - b.float()).abs()
        return d.max().item(), d.mean().item()

    def jumps(a, b):
        """Seam visibility: the largest step of the error field e = tiled - untiled between neighbouring pixels
        (|e[y+1]-e[y]|, |e[x+1]-e[x]|). A hard tile edge shows as a jump; a smooth error field has none, however
        large the error itself (the error's own size is the max/mean columns)."""
        e = a.float() - b.float()
        dy, dx = (e[:, :, 1:] - e[:, :, :-1]).abs(), (e[:, :, :, 1:] - e[:, :, :, :-1]).abs()
        return max(dy.max().item(), dx.max().item()), (dy.mean().item() + dx.mean().item()) / 2

    rows = []
    for g in (False, True):  # encode's default is False, decode's True
        zt = tiled_encode(ours, x, tile=args.tile, overlap=args.overlap, global_attention=g)
        xt = tiled_decode(ours, z, tile=args.tile, overlap=args.overlap, global_attention=g)
        name = f"ours (overlap {args.overlap} px, {'global' if g else 'per-tile'} attention)"
        rows.append((name, *stats(zt, z), *stats(xt, x_hat), *jumps(xt, x_hat)))
    zd = theirs.encode(x).latent
    xd = theirs.decode(z).sample
    rows.append((f"diffusers (blend {DIFFUSERS_BLEND} px)", *stats(zd, z), *stats(xd, x_hat), *jumps(xd, x_hat)))
    notes, f = [], ours.spatial_compression_ratio
    for name, a, b, scale in (
        ("encode (global)", zt, z, 1),
        ("decode (global)", xt, x_hat, f),
        ("diffusers decode", xd, x_hat, f),
    ):
        err = (a.float() - b.float()).abs().amax(dim=(0, 1))  # (H, W)
        y, x_ = divmod(int(err.argmax()), err.shape[1])
        line = f"{name}: max at (y, x) = ({y}, {x_}) of {tuple(err.shape)}"
        if not name.startswith("diffusers"):
            one = _one_tile_mask(err.shape, args.tile // f, args.overlap // f, scale, err.device)
            if one.any():
                line += f"; max where only one of our tiles covers (no blending changes it): {err[one].max():.4f}"
        notes.append(line)
    return rows, notes


def _one_tile_mask(shape, t: int, o: int, scale: int, device) -> torch.Tensor:
    """(H, W) bool: pixels that exactly one tile of our grid covers (tile t, overlap o in latents)."""
    masks = []
    for n in shape:
        count = torch.zeros(n, device=device)
        for s in _starts(n // scale, t, o):
            count[s * scale : (s + t) * scale] += 1
        masks.append(count == 1)
    return masks[0][:, None] & masks[1][None, :]


# (b) memory and time -----------------------------------------------------------------------------------------
def measure(args, mode: str) -> dict[str, float]:
    """One decode ('tile', 'ours', 'diffusers') -> peak bytes above the start, output bytes, seconds."""
    ours, theirs = build_pair(args.width_b, args.device, args.dtype)
    f = ours.spatial_compression_ratio
    side = args.tile // f if mode == "tile" else args.size_b // f
    z = torch.randn(1, ours.latent_channels, side, side, device=args.device, dtype=args.dtype)
    diffusers_tiling(theirs, args.tile)
    run = {
        "tile": lambda: ours.decode(z),
        "ours": lambda: tiled_decode(ours, z, tile=args.tile, overlap=args.overlap),
        "diffusers": lambda: theirs.decode(z).sample,
    }[mode]
    start = _mem_start(args.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = run()
    sync(args.device)
    seconds = time.perf_counter() - t0
    peak = _mem_peak(args.device) - start
    return {"peak": peak, "out": out.numel() * out.element_size(), "seconds": seconds}


def _mem_start(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:  # reset the RSS high-water mark (Linux)
        fh.write("5")
    return _status_kb("VmRSS") * 1024


def _mem_peak(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def measure_isolated(args, mode: str) -> dict[str, float]:
    """CUDA: in this process. CPU: a fresh process per measurement, so earlier peaks do not hide this one."""
    if args.device.startswith("cuda"):
        return measure(args, mode)
    cmd = [sys.executable, __file__, *sys.argv[1:], "--measure", mode]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def memory_and_time(args) -> dict[str, dict[str, float]]:
    runs: dict[str, list[dict[str, float]]] = {"tile": [], "ours": [], "diffusers": []}
    for _ in range(args.repeats):  # interleaved
        for mode in runs:
            runs[mode].append(measure_isolated(args, mode))
    return {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}


# Report ------------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / 2**30:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=int, default=DEFAULT_OVERLAP)
    p.add_argument("--size-a", type=int, default=1024)
    p.add_argument("--size-b", type=int, default=4096)
    p.add_argument("--width-a", type=float, default=None, help="model width for (a); default 1 on GPU, 0.25 on CPU")
    p.add_argument("--width-b", type=float, default=None, help="model width for (b); default 1 on GPU, 0.25 on CPU")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip-a", action="store_true")
    p.add_argument("--skip-b", action="store_true")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one CPU measurement
    args = p.parse_args()
    if args.tile <= DIFFUSERS_BLEND:
        p.error(f"--tile {args.tile}: must exceed diffusers' {DIFFUSERS_BLEND} px blend (its stride is tile - 64)")
    gpu = args.device.startswith("cuda")
    args.width_a = args.width_a or (1.0 if gpu else 0.25)
    args.width_b = args.width_b or (1.0 if gpu else 0.25)
    args.dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    if args.measure:
        print(json.dumps(measure(args, args.measure)))
        return
    dev = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"# bench_tiling: {VARIANT}, random weights, {dev}, {args.dtype}, tile {args.tile} px\n")
    if not args.skip_a:
        print(f"## (a) tiled vs untiled at {args.size_a} px, width x{args.width_a}\n")
        print(
            "| tiling | encode max abs diff | encode mean | decode max abs diff | decode mean "
            "| decode seam jump max | seam jump mean |"
        )
        print("|---|---|---|---|---|---|---|")
        rows, notes = seam_error(args)
        for name, emax, emean, dmax, dmean, jmax, jmean in rows:
            print(f"| {name} | {emax:.4f} | {emean:.5f} | {dmax:.4f} | {dmean:.5f} | {jmax:.4f} | {jmean:.6f} |")
        local, glob, d = rows

        def r(o, i: int) -> str:
            return f"{o[i] / d[i]:.3f}" if d[i] else "-"

        print(
            f"\nratio ours/diffusers at the defaults (decode: global attention, encode: per-tile): decode mean "
            f"{r(glob, 4)}, decode max {r(glob, 3)}, seam jump max {r(glob, 5)}, seam jump mean {r(glob, 6)}; "
            f"encode mean {r(local, 2)}, encode max {r(local, 1)}. Encode with global attention: mean "
            f"{r(glob, 2)}, max {r(glob, 1)}\n"
        )
        print("\n".join(notes) + "\n")
    if not args.skip_b:
        side = args.size_b // 32
        print(
            f"## (b) tiled decode of {args.size_b} px ({side} x {side} latent), width x{args.width_b}, "
            f"median of {args.repeats}\n"
        )
        res = memory_and_time(args)
        tile_peak = res["tile"]["peak"]
        print("| decode | peak GiB | output GiB | peak - output GiB | (peak - output) / one-tile peak | seconds |")
        print("|---|---|---|---|---|---|")
        labels = {
            "tile": f"one {args.tile} px tile, untiled",
            "ours": f"ours, overlap {args.overlap} px",
            "diffusers": f"diffusers, blend {DIFFUSERS_BLEND} px",
        }
        for mode, r in res.items():
            net = r["peak"] - r["out"]
            print(
                f"| {labels[mode]} | {gib(r['peak'])} | {gib(r['out'])} | {gib(net)} | "
                f"{net / tile_peak:.2f} | {r['seconds']:.2f} |"
            )
        print(
            f"\ntime ratio ours/diffusers: {res['ours']['seconds'] / res['diffusers']['seconds']:.2f}; "
            f"tiles: ours {_n_tiles(args, 'ours')}, diffusers {_n_tiles(args, 'diffusers')}"
        )


def _n_tiles(args, mode: str) -> int:
    lat, t = args.size_b // 32, args.tile // 32
    if mode == "diffusers":
        return math.ceil(lat / ((args.tile - DIFFUSERS_BLEND) // 32)) ** 2
    o = args.overlap // 32
    return (1 if lat <= t else math.ceil((lat - o) / (t - o))) ** 2


if __name__ == "__main__":
    main()
