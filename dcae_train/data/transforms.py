"""Image bytes -> (3, R, R) float tensor in [-1, 1]: checks, crop planning, reduced-scale decoding, RGB, flip.

The crop is planned on the header's size *before* decoding, so a JPEG much larger than the crop is decoded at
1/2, 1/4 or 1/8 scale (libjpeg DCT scaling via `Image.draft`), which is where most of the speed comes from.
Every way a sample can be bad raises `BadSample` with a short reason; the stream counts and skips those.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
WHITE = (255, 255, 255)


class BadSample(Exception):
    """A sample that cannot become a training image; `reason` is a short label used for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class TransformSpec:
    """What one stream does to each image (built from DataConfig + the phase resolution)."""

    resolution: int
    crop: str = "center"  # random | random_resized | center
    flip: bool = False
    small_images: str = "skip"  # skip | upsample
    crop_scale: tuple[float, float] = (0.25, 1.0)
    fast_decode: bool = True
    max_pixels: int = 2**27
    max_aspect: float = 16.0


# Decoding ------------------------------------------------------------------------------------------


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a WebDataset sample (first of jpg/jpeg/png/webp)."""
    for key in IMAGE_KEYS:
        data = sample.get(key)
        if data is not None:
            if not isinstance(data, bytes | bytearray) or len(data) == 0:
                raise BadSample("empty_image", f"{key} of {sample.get('__key__')} has no bytes")
            return bytes(data)
    raise BadSample("missing_image_key", f"{sample.get('__key__')} has keys {sorted(k for k in sample if k[0] != '_')}")


def open_checked(data: bytes, spec: TransformSpec) -> Image.Image:
    """Parse the header only, and reject zero-size, absurd or bomb-sized images before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning would only add noise (its hard error still counts).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample("too_many_pixels", str(e)) from None
    except Image.UnidentifiedImageError:  # its message names the buffer's memory address: same bytes, other text
        raise BadSample("undecodable", "UnidentifiedImageError: not an image format PIL can identify") from None
    except Exception as e:  # PIL raises many types for unparseable bytes
        raise BadSample("undecodable", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w < 1 or h < 1:
        raise BadSample("zero_size", f"{w}x{h}")
    if w * h > spec.max_pixels:
        raise BadSample("too_many_pixels", f"{w}x{h} > max_pixels={spec.max_pixels}")
    if max(w, h) / min(w, h) > spec.max_aspect:
        raise BadSample("absurd_aspect", f"{w}x{h} > max_aspect={spec.max_aspect}")
    return im


SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height trade places)


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = as stored)."""
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: show the pixels as stored
        return 1


def oriented_rgb(im: Image.Image) -> Image.Image:
    """The one decoder of the package (training, evaluation, reconstruct): the pixels as a viewer shows them
    (EXIF orientation applied) in RGB, 16-bit and float data scaled to 8 bits, transparency on white."""
    if orientation(im) != 1:
        im = ImageOps.exif_transpose(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white (dropping alpha shows garbage colours)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / float grayscale: rescale to 8 bits (a plain convert would clip almost everything to white).
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).astype(np.uint8), mode="L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")  # L, 1, P, CMYK (incl. Adobe inverted JPEG), YCbCr, LAB, HSV


# Crop planning (in the coordinates of the full-size image) -----------------------------------------


def plan_crop(w: int, h: int, spec: TransformSpec, rng: random.Random) -> tuple[float, float, float]:
    """(left, top, side) of the square source region that becomes the R x R output."""
    r, short = spec.resolution, min(w, h)
    if short < r and spec.small_images == "skip":
        raise BadSample("too_small", f"{w}x{h} < {r} (data.small_images=skip)")
    if spec.crop == "center":
        side = float(short)  # ADM: resize the short side to R, centre crop R x R
        return (w - side) / 2, (h - side) / 2, side
    if spec.crop == "random":
        side = float(min(r, short))  # native scale; a small image is upsampled from its largest square
        return float(rng.randint(0, w - int(side))), float(rng.randint(0, h - int(side))), side  # whole pixels
    else:  # random_resized: a square of a random area fraction, never smaller than R unless the image is
        lo, hi = spec.crop_scale
        side = math.sqrt(rng.uniform(lo, hi) * w * h)
        side = min(max(side, min(r, short)), short)
    return rng.uniform(0, w - side), rng.uniform(0, h - side), side


def draft(im: Image.Image, shrink: float) -> int:
    """Ask libjpeg for a reduced-scale decode (1/2, 1/4 or 1/8) of an image that will be shrunk by `shrink` (source
    pixels per output pixel), never below the output's resolution; return the divisor applied (1: none)."""
    if im.format != "JPEG" or shrink < 2:
        return 1
    w, h = im.size  # the decoder may shrink by 2, 4 or 8 as long as it stays >= 1 / shrink of the size
    im.draft(None, (max(1, math.ceil(w / shrink)), max(1, math.ceil(h / shrink))))
    return max(1, round(w / im.size[0]))  # DCT scaling divides both sides by the same 1, 2, 4 or 8


def _draft(im: Image.Image, side: float, spec: TransformSpec) -> int:
    """Reduced-scale decode that keeps the crop >= R pixels; return the divisor applied."""
    return draft(im, side / spec.resolution) if spec.fast_decode else 1


# The whole transform ---------------------------------------------------------------------------------


def decode_and_crop(data: bytes, spec: TransformSpec, rng: random.Random) -> torch.Tensor:
    """Encoded bytes -> (3, R, R) float32 in [-1, 1]. Raises BadSample for anything unusable."""
    im = open_checked(data, spec)
    w, h = im.size[::-1] if orientation(im) in SWAPS_SIDES else im.size  # the crop is planned as the image is seen
    left, top, side = plan_crop(w, h, spec, rng)
    flip = spec.flip and rng.random() < 0.5  # drawn here so the RNG sequence does not depend on decode success
    div = _draft(im, side, spec)  # a scale only: the same whatever the orientation
    try:
        im = oriented_rgb(im)  # decodes: truncated or corrupt data fails here
        w, h = im.size  # the drafted size is ceil(W / div): clamp against round-off at the far edges
        box = (left / div, top / div, min((left + side) / div, w), min((top + side) / div, h))
        r = spec.resolution
        out = im.resize((r, r), Image.Resampling.BICUBIC, box=box)
    except BadSample:
        raise
    except Exception as e:
        raise BadSample("undecodable", f"{type(e).__name__}: {e}") from None
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(out)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB uint8 PIL image -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
    return x.float().div_(127.5).sub_(1.0)
