"""The embedded demo dataset: scikit-image's bundled sample photographs, cut into varied crops, as shards.

Built offline on first use into `$DCAE_TRAIN_CACHE/demo/<version>` (default `~/.cache/dcae_train`), in a few
seconds. Several DDP ranks may build it at once: each builds in its own temporary folder and renames it into
place; the first rename wins and the others discard their copy.

Train and val come from different photographs, so validation measures images the model has not seen.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import skimage.data
from PIL import Image

from dcae_train.data.shards import write_shards

VERSION = "v1"  # bump when the recipe below changes, so old caches are not reused
TRAIN_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "clock_motion", "coins", "grass", "gravel", "hubble_deep_field",
    "ihc", "moon", "motorcycle_left", "motorcycle_right", "retina",
)  # fmt: skip
VAL_PHOTOS = ("chelsea", "coffee", "rocket")
NUM_TRAIN, NUM_VAL = 384, 32
TRAIN_PER_SHARD, VAL_PER_SHARD = 48, 16  # 8 train shards: enough for 2 ranks x 4 workers to read disjoint ones
MIN_SIDE, MAX_SIDE = 256, 448  # crop sizes: >= 256 so the quickstart's phase 2 (256 px) needs no upsampling


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    root = cache_dir or os.environ.get("DCAE_TRAIN_CACHE") or Path.home() / ".cache" / "dcae_train"
    return Path(root).expanduser()


def _photo_dir() -> Path:
    return Path(skimage.data.__file__).parent


def _load_photos(names: tuple[str, ...]) -> list[tuple[str, Image.Image]]:
    """The bundled files themselves (no network): the fetchable extras of skimage are not used."""
    folder, photos = _photo_dir(), []
    for name in names:
        files = sorted(folder.glob(f"{name}.*"))
        if files:
            with Image.open(files[0]) as im:
                photos.append((name, im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()))
    if len(photos) < max(2, len(names) // 2):
        raise RuntimeError(
            f"scikit-image's sample photographs are missing from {folder} (found {len(photos)} of {len(names)}); "
            "reinstall scikit-image, or give data.train=<your shards>"
        )
    return photos


def _crop(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random rectangle of 256-448 px per side, at a random zoom (0.6-1.4 source px per output px), maybe flipped."""
    w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    zoom = rng.uniform(0.6, 1.4)
    zoom = min(zoom, photo.width / w, photo.height / h)  # the source region must fit in the photo
    sw, sh = min(w * zoom, photo.width), min(h * zoom, photo.height)  # min(): float round-off
    left, top = rng.uniform(0, photo.width - sw), rng.uniform(0, photo.height - sh)
    out = photo.resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + sw, top + sh))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out


def _crops(names: tuple[str, ...], count: int, seed: int) -> list[tuple[str, bytes]]:
    rng, photos = random.Random(seed), _load_photos(names)
    items = []
    for i in range(count):
        buf = io.BytesIO()
        name, photo = photos[i % len(photos)]
        _crop(photo, rng).save(buf, format="JPEG", quality=90)
        items.append((f"demo/{name}/{i}", buf.getvalue()))
    return items


def _build(folder: Path) -> None:
    train = write_shards(
        _crops(TRAIN_PHOTOS, NUM_TRAIN, seed=0), folder, samples_per_shard=TRAIN_PER_SHARD, prefix="train",
        progress=False,
    )  # fmt: skip
    val = write_shards(
        _crops(VAL_PHOTOS, NUM_VAL, seed=1), folder / "val", samples_per_shard=VAL_PER_SHARD, prefix="val",
        shuffle_seed=None, progress=False,
    )  # fmt: skip
    (folder / "demo.json").write_text(json.dumps({"version": VERSION, "train": train.total, "val": val.total}))


def _specs(folder: Path) -> dict:
    info = json.loads((folder / "demo.json").read_text())
    return {
        "train": str(folder / f"train-{{000000..{NUM_TRAIN // TRAIN_PER_SHARD - 1:06d}}}.tar"),
        "val": str(folder / "val" / f"val-{{000000..{NUM_VAL // VAL_PER_SHARD - 1:06d}}}.tar"),
        "num_train": info["train"],
        "num_val": info["val"],
        "dir": str(folder),
    }


def demo_shards(cache_dir: str | os.PathLike | None = None) -> dict:
    """Local shard specs of the demo dataset, building it first if needed.

    Returns `{"train": <brace pattern>, "val": <brace pattern>, "num_train": 384, "num_val": 32, "dir": <folder>}`.
    """
    final = cache_root(cache_dir) / "demo" / VERSION
    if (final / "demo.json").exists():
        return _specs(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}-build-", dir=final.parent))
    try:
        _build(tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process renamed its copy first
        except OSError:
            if not (final / "demo.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _specs(final)
