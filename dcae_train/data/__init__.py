"""Data: WebDataset shards (or the embedded demo photographs) -> batches of crops in [-1, 1].

    from dcae_train.data import DataConfig, TrainStream, sources_from_spec

Modules: config (DataConfig), specs (shard specs -> URLs), transforms (decode/crop/flip), webdataset (streams,
loader), shards (write shards), demo (the demo dataset), buckets (aspect-ratio buckets), latents (latent shards and
`LatentDataset`, their reader). Lightning-free: the trainer's `ImageDataModule` is
`dcae_train.training.datamodule`. See docs/data.md and docs/latents.md.
"""

from dcae_train.data.config import DataConfig
from dcae_train.data.demo import demo_shards
from dcae_train.data.latents import LatentDataset
from dcae_train.data.shards import write_shards
from dcae_train.data.specs import Source, expand_urls, sources_from_spec
from dcae_train.data.transforms import BadSample, TransformSpec, decode_and_crop
from dcae_train.data.webdataset import StreamLoader, TrainStream, ValStream

__all__ = [
    "BadSample",
    "DataConfig",
    "LatentDataset",
    "Source",
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
