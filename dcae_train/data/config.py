"""`DataConfig`: where the images come from and how they become (B, 3, H, W) tensors in [-1, 1]. Torch-free.

The defaults are those of real WebDataset shards; `conf/data/demo.yaml` overrides them for the demo photographs.
`train` has no default (`DataConfig(train="demo")` or your shards): a released recipe never falls back to demo data.
Every rule is checked here, once, before any shard is opened: shard specs that name local files must match
files now, not after the model is built and the workers started.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dcae_train.data.specs import check_spec, is_demo, sources_from_spec
from dcae_train.schema import MISSING, ConfigError, check_at_least, check_choice, is_missing, require

CROPS = ("center", "random", "random_resized")
CROP_ALIASES = {"adm": "center"}  # ADM/DMCrop: resize the short side to the resolution, then centre crop
SMALL_IMAGE_POLICIES = ("skip", "upsample")


@dataclass
class DataConfig:
    # Required. Shard spec: path, brace pattern, folder of .tar, `a::b`, pipe:/https:// URL, list, or list of
    # {spec, weight}; `demo` = the embedded demo photographs (data=demo). See docs/data.md.
    train: Any = MISSING
    val: Any = None  # shard spec of the validation images; null = demo val when train is demo (required otherwise)
    num_workers: int = 8  # DataLoader workers per rank; decoding is the cost: ~1 core per 100-300 images/s at 256 px
    val_num_workers: int | None = 4  # null = num_workers
    crop: str = "center"  # center (ADM/DMCrop: short side -> R, centre crop; alias adm) | random | random_resized
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # random_resized: area fraction range
    flip: bool = True  # random horizontal flip (training only)
    small_images: str = "skip"  # short side < resolution: skip (counted in train/data_skipped) | upsample
    epoch_batches: int = 1000  # batches per rank per epoch: the same on every rank, so DDP never waits
    shuffle_buffer: int = 1000  # samples per worker; more = better mixing, more memory (x num_workers x ranks)
    val_samples: int | None = 1000  # the first N val samples, same images and order at any world size; null = all
    fast_decode: bool = True  # reduced-scale JPEG decoding (DCT scaling) when the crop is >= 2x the resolution
    max_pixels: int = 2**27  # larger images are skipped as decompression bombs (~134 MP)
    max_aspect: float = 16.0  # long/short side above this is an absurd image: skipped
    prefetch_factor: int = 2  # batches prefetched per worker
    warn_every_s: float = 60.0  # at most one bad-sample warning per worker per this many seconds

    def __post_init__(self) -> None:
        self.crop = CROP_ALIASES.get(self.crop, self.crop)
        check_choice("crop", self.crop, CROPS)
        check_choice("small_images", self.small_images, SMALL_IMAGE_POLICIES)
        rule = "must be [min, max] with 0 < min <= max <= 1"
        require(len(self.crop_scale) == 2, "crop_scale", list(self.crop_scale), rule, [0.25, 1.0])
        lo, hi = (float(v) for v in self.crop_scale)
        require(0.0 < lo <= hi <= 1.0, "crop_scale", list(self.crop_scale), rule, [0.25, 1.0])
        self.crop_scale = [lo, hi]
        check_at_least(self, ("epoch_batches", "shuffle_buffer", "prefetch_factor", "max_pixels"), 1)
        require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0 (0 = main process)", 8)
        workers = self.val_num_workers
        require(workers is None or workers >= 0, "val_num_workers", workers, "must be >= 0 or null", 4)
        require(
            self.val_samples is None or self.val_samples >= 1, "val_samples", self.val_samples, "must be >= 1 or null"
        )
        require(self.warn_every_s >= 0, "warn_every_s", self.warn_every_s, "must be >= 0 (0 = every bad sample)", 60.0)
        require(self.max_aspect >= 1, "max_aspect", self.max_aspect, "must be >= 1 (long side / short side)", 16.0)
        self._check_specs()

    def _check_specs(self) -> None:
        if is_missing(self.train) or is_missing(self.val):
            return  # a required value not given yet: the schema boundary names it
        if self.val is None and not is_demo(self.train):
            raise ConfigError(
                "val", None, "is required when {p}train names your shards", "/data/val-{000000..000009}.tar"
            )
        for name in ("train", "val"):
            spec = getattr(self, name)
            check_spec(spec, name)
            if not is_demo(spec):
                sources_from_spec(spec, name)
