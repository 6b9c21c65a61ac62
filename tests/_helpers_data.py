"""Tiny images and tar shards made on the fly for the data tests (no files shipped, no network)."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB uint8 array (gradients + blobs + a little noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(1, 6, 3)
        img[..., c] = 127 + 90 * np.sin(xx / w * fx * 3 + ph) * np.cos(yy / h * fy * 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(w: int = 96, h: int = 80, seed: int = 0, mode: str = "RGB", quality: int = 90) -> bytes:
    im = Image.fromarray(photo(w, h, seed))
    if mode != "RGB":
        im = im.convert(mode)
    return encode(im, "JPEG", quality=quality)


def png(w: int = 96, h: int = 80, seed: int = 0, mode: str = "RGB") -> bytes:
    im = Image.fromarray(photo(w, h, seed))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(im.convert("L"), np.uint16) * 257).astype(np.uint16))
    elif mode == "P":
        im = im.quantize(64)
    elif mode != "RGB":
        im = im.convert(mode)
    return encode(im, "PNG")


def png_bomb(w: int = 60000, h: int = 60000) -> bytes:
    """A tiny PNG whose header (with a valid CRC) claims w x h pixels: a decompression bomb by its header."""
    data = bytearray(png(8, 8))
    ihdr = 8  # after the PNG signature: length (4) + b"IHDR" (4) + 13 data bytes + CRC (4)
    data[ihdr + 8 : ihdr + 16] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[ihdr + 4 : ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(data)


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """samples: [{"__key__": "k", "jpg": b"...", ...}] -> a WebDataset tar at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for s in samples:
            key = s["__key__"]
            for ext, payload in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def clean_shards(folder: Path, sizes: list[int], w: int = 72, h: int = 64, prefix: str = "shard") -> list[str]:
    """Shards of valid JPEGs with the given sample counts; keys name the shard (`s<i>_<j>`)."""
    urls = []
    for i, n in enumerate(sizes):
        samples = [{"__key__": f"s{i}_{j}", "jpg": jpeg(w, h, seed=100 * i + j)} for j in range(n)]
        urls.append(str(write_tar(folder / f"{prefix}-{i:06d}.tar", samples)))
    return urls


def messy_samples() -> tuple[list[dict[str, bytes]], int]:
    """Valid images in every awkward mode plus each kind of bad sample; returns (samples, number of bad ones)."""
    good = {
        "rgb_jpg": {"jpg": jpeg()},
        "gray_jpg": {"jpg": jpeg(mode="L")},
        "cmyk_jpg": {"jpg": jpeg(mode="CMYK")},
        "rgba_png": {"png": png(mode="RGBA")},
        "la_png": {"png": png(mode="LA")},
        "palette_png": {"png": png(mode="P")},
        "gray16_png": {"png": png(mode="I;16")},
        "rgb_webp": {"webp": encode(Image.fromarray(photo(96, 80)), "WEBP")},
        "big_jpg": {"jpg": jpeg(400, 300)},  # decoded at reduced scale at 64 px
    }
    full = jpeg(96, 80, seed=7)
    bad = {
        "corrupt": {"jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4},
        "truncated": {"jpg": full[: len(full) // 2]},
        "garbage": {"png": b"not an image at all"},
        "empty": {"jpg": b""},
        "missing_key": {"txt": b"a caption without an image"},
        "tiny": {"jpg": jpeg(16, 12)},  # smaller than the 64 px crop (small_images=skip)
        "absurd_aspect": {"png": png(2000, 70)},
        "bomb": {"png": png_bomb()},
    }
    samples = [{"__key__": k, **v} for k, v in {**good, **bad}.items()]
    return samples, len(bad)
