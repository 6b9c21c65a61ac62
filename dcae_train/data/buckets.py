"""Aspect-ratio buckets: a table of (height, width) sizes of about the same pixel count, the bucket nearest an image's
aspect ratio, and the centred part of the image that fills it. Torch-free.

Multi-aspect diffusion trainers (PixArt, SANA) batch images of one bucket together, so no image is squashed or cut
to a square. The default table, `sana`, holds the 40 aspect ratios (height / width from 0.25 to 4.0) of SANA's
`ASPECT_RATIO_1024` (NVlabs/Sana, `diffusion/data/datasets/utils.py`, taken over from PixArt-alpha/PixArt-sigma),
scaled to the target pixel count R x R and rounded to multiples of the model's spatial compression f. SANA's own
`ASPECT_RATIO_512` and `ASPECT_RATIO_2048` are the same table scaled by 1/2 and 2, so at R = 512, 1024 or 2048 with
an f32 model this is SANA's table exactly (a test checks R = 512).

An image goes to the bucket whose aspect ratio is nearest its own in log scale (SANA compares h/w linearly, which
between two neighbours favours the wider bucket); it is scaled to cover the bucket and centre-cropped, as SANA's
`T.Resize` + `CenterCrop`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from dcae_train.schema import ConfigError

Bucket = tuple[int, int]  # (height, width) in pixels, SANA's order

# SANA's ASPECT_RATIO_1024, (height, width), sorted by height / width; the keys of the original are these ratios
# rounded to two decimals (0.25, 0.26, ..., 4.0).
SANA_1024: tuple[Bucket, ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip


# Tables ------------------------------------------------------------------------------------------------------
def sana_buckets(resolution: int, multiple: int) -> tuple[Bucket, ...]:
    """SANA's table for about resolution^2 pixels, each side rounded to a multiple of `multiple` (duplicates once)."""
    scale = resolution / 1024
    table = [tuple(max(multiple, round(s * scale / multiple) * multiple) for s in hw) for hw in SANA_1024]
    return tuple(dict.fromkeys(table))  # type: ignore[arg-type]  # rounding can merge neighbours


def read_buckets(spec: str, resolution: int, multiple: int) -> tuple[Bucket, ...]:
    """`sana`, or a JSON file holding [[height, width], ...] or SANA's form {"ratio": [height, width], ...}."""
    if spec == "sana":
        return sana_buckets(resolution, multiple)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError("--buckets", spec, "give `sana` or a JSON file of [[height, width], ...]", "sana")
    try:
        data: Any = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("--buckets", spec, f"is not valid JSON ({e})", "sana") from None
    entries = list(data.values()) if isinstance(data, dict) else data
    table = tuple(_bucket(entry, spec) for entry in (entries if isinstance(entries, list) else [entries]))
    check_buckets(table, multiple, spec)
    return tuple(dict.fromkeys(table))


def _bucket(entry: Any, spec: str) -> Bucket:
    ok = isinstance(entry, list | tuple) and len(entry) == 2
    ok = ok and all(isinstance(v, int | float) and v == int(v) and v > 0 for v in entry)
    if not ok:
        raise ConfigError("--buckets", spec, f"entry {entry!r} is not [height, width] in pixels", "[[512, 512]]")
    return int(entry[0]), int(entry[1])


def check_buckets(table: tuple[Bucket, ...], multiple: int, where: str) -> None:
    """Every side a multiple of the model's spatial compression (the latent must have whole pixels)."""
    if not table:
        raise ConfigError("--buckets", where, "the bucket table is empty", "sana")
    bad = [b for b in table if b[0] % multiple or b[1] % multiple]
    if bad:
        raise ConfigError("--buckets", where, f"{bad[:3]} are not multiples of the model's compression {multiple}")


# Placing an image --------------------------------------------------------------------------------------------
def nearest_bucket(width: int, height: int, table: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, in log scale (1:2 and 2:1 are equally far from 1:1)."""
    aspect = math.log(height / width)
    return min(table, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def cover_scale(width: int, height: int, bucket: Bucket) -> float:
    """Output pixels per image pixel when the image is scaled to cover the bucket (> 1: upsampling)."""
    return max(bucket[0] / height, bucket[1] / width)


def cover_box(width: int, height: int, bucket: Bucket) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in image pixels of the centred region with the bucket's aspect ratio."""
    scale = cover_scale(width, height, bucket)
    w, h = min(bucket[1] / scale, width), min(bucket[0] / scale, height)  # the covered side: exactly the image's
    left, top = (width - w) / 2, (height - h) / 2
    return left, top, left + w, top + h
