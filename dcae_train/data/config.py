"""DataConfig: the typed form of `conf/data/*.yaml`. Validated once, before any shard is opened."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

CROPS = ("random", "random_resized", "center")
CROP_ALIASES = {"adm": "center"}  # ADM/DMCrop: resize the short side to the resolution, then centre crop
SMALL_IMAGE_POLICIES = ("skip", "upsample")


@dataclass
class DataConfig:
    """Where the images come from and how they become (B, 3, H, W) tensors in [-1, 1].

    Shard specs (`train`, `val`) take the forms WebDataset reads:
      - `null` or `"demo"`: the embedded demo photographs (built into a cache folder on first use);
      - a string: one path/URL, a brace pattern `shards/train-{000000..000999}.tar`, several joined by `::`,
        a folder (all `*.tar` in it), or `pipe:`/`https://` URLs;
      - a list of such strings (one source);
      - a list of `{spec: ..., weight: ...}` (a mixture: each sample comes from a source with probability
        proportional to its weight).
    """

    train: Any = None  # shard spec; null / "demo" = the embedded demo data
    val: Any = None  # shard spec; null = demo val when train is demo (required otherwise)
    num_workers: int = 4  # DataLoader workers per rank for training
    val_num_workers: int | None = None  # null = num_workers
    crop: str = "center"  # random (native scale) | random_resized | center (alias adm: ADM resize + centre crop)
    crop_scale: list[float] = field(default_factory=lambda: [0.25, 1.0])  # random_resized: area fraction range
    flip: bool = True  # random horizontal flip (training only)
    small_images: str = "skip"  # short side < resolution: skip (counted) | upsample
    epoch_batches: int = 1000  # batches per rank per epoch: the same on every rank, so DDP never waits
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer
    val_samples: int | None = None  # the first N samples of `val` in shard order (null = all)
    fast_decode: bool = True  # reduced-scale JPEG decoding (DCT scaling) when the target is much smaller
    max_pixels: int = 2**27  # larger images are treated as decompression bombs and skipped (~134 MP)
    max_aspect: float = 16.0  # long/short side above this is an absurd image: skipped
    prefetch_factor: int = 2  # batches prefetched per worker
    warn_every_s: float = 60.0  # at most one bad-sample warning per worker per this many seconds

    def __post_init__(self) -> None:
        self.crop = CROP_ALIASES.get(self.crop, self.crop)
        if self.crop not in CROPS:
            raise ValueError(f"data.crop={self.crop!r} is not one of {CROPS} (or 'adm', an alias of 'center')")
        if self.small_images not in SMALL_IMAGE_POLICIES:
            raise ValueError(f"data.small_images={self.small_images!r} must be one of {SMALL_IMAGE_POLICIES}")
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"data.crop_scale={list(self.crop_scale)} must satisfy 0 < min <= max <= 1")
        self.crop_scale = [lo, hi]
        self._check_positive("epoch_batches", self.epoch_batches)
        self._check_positive("shuffle_buffer", self.shuffle_buffer)
        self._check_positive("prefetch_factor", self.prefetch_factor)
        self._check_positive("max_pixels", self.max_pixels)
        if self.num_workers < 0 or (self.val_num_workers is not None and self.val_num_workers < 0):
            raise ValueError(f"data.num_workers={self.num_workers} / val_num_workers must be >= 0 (0 = main process)")
        if self.val_samples is not None and self.val_samples < 1:
            raise ValueError(f"data.val_samples={self.val_samples} must be >= 1 or null (all)")
        if self.max_aspect < 1:
            raise ValueError(f"data.max_aspect={self.max_aspect} must be >= 1 (long side / short side)")
        if self.val is None and not is_demo(self.train):
            raise ValueError(
                "data.val is required when data.train names your shards: set data.val=<val shards> "
                "(or data.val=demo for a quick check)"
            )
        for name in ("train", "val"):
            check_spec(getattr(self, name), f"data.{name}")

    @staticmethod
    def _check_positive(name: str, value: int) -> None:
        if value < 1:
            raise ValueError(f"data.{name}={value} must be >= 1")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> DataConfig:
        """Build from a plain dict (e.g. the `data` node of the composed config); unknown keys fail by name."""
        d = _plain(dict(d or {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown data config key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**d)


def _plain(x: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists, so that the spec checks see ordinary types."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency, but the data layer does not need it
        return x
    if isinstance(x, DictConfig | ListConfig):
        return OmegaConf.to_container(x, resolve=True)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def is_demo(spec: Any) -> bool:
    return spec is None or spec == "demo"


def check_spec(spec: Any, where: str) -> None:
    """Shape check of a shard spec (no file access): see DataConfig for the accepted forms."""
    if is_demo(spec) or (isinstance(spec, str) and spec.strip()):
        return
    if not isinstance(spec, list | tuple) or not spec:
        raise ValueError(f"{where}={spec!r}: give a shard path/pattern, a list of them, or a list of {{spec, weight}}")
    if all(isinstance(s, str) and s for s in spec):
        return
    for i, entry in enumerate(spec):
        if not (isinstance(entry, dict) and "spec" in entry):
            raise ValueError(f"{where}[{i}]={entry!r}: mixture entries are {{spec: <shards>, weight: <float>}}")
        extra = set(entry) - {"spec", "weight"}
        if extra:
            raise ValueError(f"{where}[{i}] has unknown key(s) {sorted(extra)}; allowed: spec, weight")
        if float(entry.get("weight", 1.0)) <= 0:
            raise ValueError(f"{where}[{i}].weight={entry.get('weight')} must be > 0")
        check_spec(entry["spec"], f"{where}[{i}].spec")
