"""Data: WebDataset shards (or the embedded demo photographs) -> batches of crops in [-1, 1].

    from dcae_train.data import DataConfig, ImageDataModule
    dm = ImageDataModule(DataConfig(train="shards/train-{000000..000099}.tar", val="shards/val-000000.tar"),
                         resolution=256, batch_size=32, seed=0)

Modules: config (DataConfig), transforms (decode/crop/flip), webdataset (shard specs, streams, loader),
shards (write shards), demo (the demo dataset), datamodule (ImageDataModule).
"""

from dcae_train.data.config import DataConfig
from dcae_train.data.datamodule import ImageDataModule
from dcae_train.data.demo import demo_shards
from dcae_train.data.shards import write_shards
from dcae_train.data.transforms import BadSample, TransformSpec, decode_and_crop
from dcae_train.data.webdataset import StreamLoader, TrainStream, ValStream, expand_urls, sources_from_spec

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
