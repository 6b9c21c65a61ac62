"""Reference (real-image) Inception statistics: computed once per dataset + resolution + feature space, cached.

The key hashes the dataset's file list (names, sizes, mtimes), the resolution, the crop, the feature
extractor and the image count, so a changed dataset or protocol never reuses stale statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from dcae_train.evaluation.data import EvalData
from dcae_train.evaluation.metrics import FeatureStats


def default_cache_dir() -> Path:
    root = os.environ.get("DCAE_TRAIN_CACHE") or Path.home() / ".cache" / "dcae_train"  # shared with the demo data
    return Path(root) / "fid_stats"


def reference_path(
    data: EvalData, resolution: int, features: str, num_images: int | None, cache_dir: Path | None = None
) -> Path:
    meta = {
        "data": data.fingerprint(),
        "resolution": resolution,
        "crop": "adm-center",
        "features": features,
        "num_images": num_images,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20]
    name = Path(data.root.rstrip("/")).name or "data"
    return (cache_dir or default_cache_dir()) / f"{name}-{resolution}-{features}-{key}.npz"


def load_reference(path: Path) -> FeatureStats | None:
    return FeatureStats.load(path) if path.is_file() else None
