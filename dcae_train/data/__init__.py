"""Data: WebDataset shards (or the embedded demo photographs) -> batches of crops in [-1, 1].

    from dcae_train.data import DataConfig, ImageDataModule
    dm = ImageDataModule(DataConfig(train="shards/train-{000000..000099}.tar", val="shards/val-000000.tar"),
                         resolution=256, batch_size=32, seed=0)

Modules: config (DataConfig), transforms (decode/crop/flip), webdataset (shard specs, streams, loader),
shards (write shards), demo (the demo dataset), datamodule (ImageDataModule).
Names are imported lazily, so `scripts/make_shards.py` (PIL only) does not pay for torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DataConfig": "config",
    "ImageDataModule": "datamodule",
    "demo_shards": "demo",
    "write_shards": "shards",
    "BadSample": "transforms",
    "TransformSpec": "transforms",
    "decode_and_crop": "transforms",
    "StreamLoader": "webdataset",
    "TrainStream": "webdataset",
    "ValStream": "webdataset",
    "expand_urls": "webdataset",
    "sources_from_spec": "webdataset",
}
__all__ = [
    "BadSample",
    "DataConfig",
    "ImageDataModule",
    "StreamLoader",
    "TrainStream",
    "TransformSpec",
    "ValStream",
    "decode_and_crop",
    "demo_shards",
    "expand_urls",
    "sources_from_spec",
    "write_shards",
]

if TYPE_CHECKING:
    from dcae_train.data.config import DataConfig
    from dcae_train.data.datamodule import ImageDataModule
    from dcae_train.data.demo import demo_shards
    from dcae_train.data.shards import write_shards
    from dcae_train.data.transforms import BadSample, TransformSpec, decode_and_crop
    from dcae_train.data.webdataset import StreamLoader, TrainStream, ValStream, expand_urls, sources_from_spec


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dcae_train.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"dcae_train.data.{_EXPORTS[name]}"), name)
