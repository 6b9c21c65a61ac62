"""Encode and decode your own images with a DC-AE, tiling automatically when they are larger than a tile.

    python -m dcae_train.reconstruct photo.jpg scan.png --model mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers --out recon/

For each image writes `<out>/<name>_recon.png` (same size as the input) and `<out>/<name>_compare.png`
(original | reconstruction, with the PSNR on uint8 in the caption), and prints a PSNR table.
Any size works: the image is padded to a multiple of the compression ratio and the output cropped back.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dcae_train.data.shards import check_output_folder
from dcae_train.data.transforms import oriented_rgb
from dcae_train.evaluation.metrics import psnr_per_image, to_uint8
from dcae_train.models.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, tiled_decode, tiled_encode
from dcae_train.models.tiling import _check_sizes as check_tile_sizes
from dcae_train.weights import WeightsError, load_model

CAPTION_PX = 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcae_train.reconstruct", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--model", required=True, help="variant, diffusers folder, original .safetensors, .ckpt or HF id")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help=f"tile size in pixels (default {DEFAULT_TILE})")
    p.add_argument("--overlap", type=int, default=None, help=f"tile overlap in pixels (default {DEFAULT_OVERLAP})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute dtype")
    p.add_argument("--raw", action="store_true", help="from our checkpoints: the raw weights instead of the EMA")
    return p.parse_args(argv)


def load_image(path: Path) -> torch.Tensor:
    """File -> (1, 3, H, W) float in [-1, 1]."""
    try:
        with Image.open(path) as img:
            rgb = np.asarray(oriented_rgb(img), dtype=np.float32)  # the training decoder: EXIF, 16-bit
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the image ({err})") from err
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1.0


@torch.inference_mode()
def reconstruct(model, x: torch.Tensor, *, tile: int, overlap: int | None) -> torch.Tensor:
    """(1, 3, H, W) -> reconstruction cropped back to (H, W); one tile = plain encode/decode."""
    z = tiled_encode(model, x, tile=tile, overlap=overlap)
    x_hat = tiled_decode(model, z, tile=tile, overlap=overlap)
    return x_hat[:, :, : x.shape[2], : x.shape[3]]


def side_by_side(x_u8: torch.Tensor, x_hat_u8: torch.Tensor, caption: str) -> Image.Image:
    """original | reconstruction with a caption strip underneath."""
    pair = torch.cat([x_u8[0], x_hat_u8[0]], dim=2).permute(1, 2, 0).cpu().numpy()  # (H, 2W, 3)
    canvas = Image.new("RGB", (pair.shape[1], pair.shape[0] + CAPTION_PX), "white")
    canvas.paste(Image.fromarray(pair), (0, 0))
    ImageDraw.Draw(canvas).text((4, pair.shape[0] + 6), caption, fill="black")
    return canvas


def check_args(args: argparse.Namespace, f: int) -> list[Path]:
    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"image file(s) not found: {missing}")
    if args.tile <= 0 or args.tile % f:
        raise ValueError(f"--tile {args.tile}: must be a positive multiple of the compression ratio {f}, e.g. 512")
    try:
        check_tile_sizes(f, args.tile, args.overlap)
    except ValueError as err:
        raise ValueError(f"--overlap: {err}") from None
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """One output name per input: the file's stem, with -2, -3, ... when two inputs share a stem (a/x.jpg, b/x.png),
    so no output overwrites another."""
    names: list[str] = []
    for path in paths:
        name, n = path.stem, 1
        while name in names:
            n += 1
            name = f"{path.stem}-{n}"
        names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = Path(args.out)
        check_output_folder(out)  # before the model loads: a wrong --out costs no download
        model = load_model(args.model, ema=not args.raw)
        paths = check_args(args, model.spatial_compression_ratio)
    except (WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = model.to(args.device, dtype)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked above; a race with another process can still lose
        print(f"error: --out {out}: cannot create the folder ({err.strerror})", file=sys.stderr)
        return 2
    print(f"{'image':<40} {'size':>11} {'PSNR (dB)':>10}  output")
    skipped = []
    for path, name in zip(paths, output_names(paths), strict=True):
        try:
            x = load_image(path).to(args.device, dtype)
        except ValueError as err:  # one unreadable file never stops the others
            skipped.append(path)
            print(f"skipped {err}", file=sys.stderr)
            continue
        x_hat = reconstruct(model, x, tile=args.tile, overlap=args.overlap)
        x_u8, x_hat_u8 = to_uint8(x), to_uint8(x_hat)
        psnr = psnr_per_image(x_u8, x_hat_u8).item()
        Image.fromarray(x_hat_u8[0].permute(1, 2, 0).cpu().numpy()).save(out / f"{name}_recon.png")
        caption = f"{path.name}: original | reconstruction ({args.model}), PSNR {psnr:.2f} dB"
        side_by_side(x_u8, x_hat_u8, caption).save(out / f"{name}_compare.png")
        print(f"{path.name:<40} {f'{x.shape[3]}x{x.shape[2]}':>11} {psnr:>10.2f}  {name}_recon.png")
    if skipped:
        print(f"{len(skipped)} of {len(paths)} image(s) skipped as unreadable", file=sys.stderr)
    return 2 if len(skipped) == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
