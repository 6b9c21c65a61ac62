"""Latent shards: the format `python -m dcae_train.encode_dataset` writes, and `LatentDataset`, which streams it back
as batches for any diffusion trainer. Lightning-free.

A sample of a latent shard (WebDataset layout, members `<key>.<field>`):

    <key>.npy | <key>.safetensors   the unscaled latent (C, h, w), fp32/fp16 (.npy) or fp32/fp16/bf16 (.safetensors)
    <key>.latent.json               {"key", "source", "width", "height", "crop_box", "bucket", "tiled"}
    <key>.<other>                   every non-image field of the source sample, unchanged (captions .txt, .json, ...)

Beside the shards: `manifest.json` (model, settings, counts, skipped samples, statistics), `latent_stats.npz` and one
record `<shard>.json` per shard. See docs/latents.md.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_from_bytes
from safetensors.torch import save as safetensors_to_bytes
from torch.utils.data import IterableDataset
from webdataset.tariterators import tarfile_samples

from dcae_train.data.specs import expand_urls
from dcae_train.data.webdataset import SkipCounter, shuffled, slice_shards, worker_slot

LATENT_FORMATS = ("npy", "safetensors")
META_FIELD = "latent.json"
MANIFEST = "manifest.json"
STATS_FILE = "latent_stats.npz"
SCALES = ("model", "measured")


# The latent of one sample --------------------------------------------------------------------------------
def latent_to_bytes(z: torch.Tensor, fmt: str) -> bytes:
    """(C, h, w) tensor -> the bytes of a `.npy` or `.safetensors` member (deterministic: same tensor, same bytes)."""
    if fmt == "safetensors":
        return safetensors_to_bytes({"latent": z.contiguous()})
    buf = io.BytesIO()
    np.save(buf, z.numpy(), allow_pickle=False)
    return buf.getvalue()


def latent_from_bytes(data: bytes, fmt: str) -> torch.Tensor:
    if fmt == "safetensors":
        return safetensors_from_bytes(data)["latent"]
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


def decode_field(name: str, data: bytes) -> Any:
    """A passed-through field as a trainer wants it: text as str, JSON parsed, `.cls` as int, anything else as bytes."""
    if name in ("txt", "text", "caption"):
        return data.decode("utf-8")
    if name.endswith("json"):
        return json.loads(data)
    if name == "cls":
        return int(data)
    return data


def read_manifest(spec: str | Path) -> dict | None:
    """The manifest of a latent folder, or of the folder holding the first shard of a shard spec."""
    path = Path(spec)
    folder = path if path.is_dir() else Path(expand_urls(str(spec))[0]).parent
    manifest = folder / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


# The reader ----------------------------------------------------------------------------------------------
class LatentDataset(IterableDataset):
    """Latent shards -> samples, or batches of one bucket (one latent shape), for one rank.

    `spec`: a latent folder or any shard spec (`expand_urls`). `scale`: None (unscaled, as stored), "model" (the
    model's scaling_factor, from the manifest), "measured" (1 / RMS of these latents, from the manifest) or a number.
    Each pass reads this rank's shards once (every world_size-th, then every num_workers-th per DataLoader worker);
    with `shuffle` > 0 the shard order is redrawn each epoch (`set_epoch`) and samples go through a shuffle buffer of
    that size. A batch is a dict: `latent` (B, C, h, w) float, `key`, `meta` (the latent.json) and one list per
    passed-through field (None where a sample lacks it). A bucket's last, smaller batch is kept unless `drop_last`.
    """

    def __init__(
        self,
        spec: str | Path,
        *,
        batch_size: int | None = None,
        scale: str | float | None = None,
        shuffle: int = 0,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.urls = tuple(expand_urls(str(spec)))
        if not self.urls:
            raise ValueError(f"LatentDataset({str(spec)!r}): no shards there; give a latent folder or a shard pattern")
        self.manifest = read_manifest(spec)
        self.factor = _factor(scale, self.manifest, spec)
        self.batch_size, self.shuffle, self.seed, self.drop_last, self.dtype = (
            batch_size,
            shuffle,
            seed,
            drop_last,
            dtype,
        )
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if dist else 0)
        self.world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if dist else 1)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shards(self, worker: int = 0, num_workers: int = 1) -> tuple[str, ...]:
        """The shards this rank's `worker` reads in the current epoch."""
        order = list(self.urls)
        if self.shuffle:
            random.Random(f"dcae_train/latents/{self.seed}/{self.epoch}").shuffle(order)  # the same on every rank
        return slice_shards(slice_shards(tuple(order), self.rank, self.world_size), worker, num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        counter = SkipCounter(f"latents rank {self.rank} worker {worker}", 60.0)
        samples: Iterator[dict] = tarfile_samples(
            ({"url": u} for u in self.shards(worker, num_workers)), handler=counter.tar_handler
        )
        if self.shuffle:
            rng = random.Random(f"dcae_train/latents/{self.seed}/{self.epoch}/{self.rank}/{worker}")
            samples = shuffled(samples, self.shuffle, rng)
        decoded = (self._decode(s) for s in samples)
        yield from decoded if self.batch_size is None else _by_bucket(decoded, self.batch_size, self.drop_last)

    def _decode(self, sample: dict) -> dict[str, Any]:
        fmt = next((f for f in LATENT_FORMATS if f in sample), None)
        if fmt is None:
            raise ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')} holds no .npy/.safetensors")
        z = latent_from_bytes(sample[fmt], fmt).to(self.dtype)
        out: dict[str, Any] = {"latent": z * self.factor if self.factor != 1.0 else z, "key": sample["__key__"]}
        for name, data in sample.items():
            if name in (fmt, META_FIELD) or name.startswith("__"):
                continue
            out[name] = decode_field(name, data)
        out["meta"] = json.loads(sample[META_FIELD]) if META_FIELD in sample else {}
        return out


def _factor(scale: str | float | None, manifest: dict | None, spec: str | Path) -> float:
    if scale is None:
        return 1.0
    if not isinstance(scale, str):
        return float(scale)
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r}: use None, a number, or one of {SCALES}")
    if manifest is None:
        raise ValueError(f"scale={scale!r} needs the {MANIFEST} of {spec}; pass the number instead, e.g. scale=0.4")
    return float(manifest["model"]["scaling_factor"] if scale == "model" else manifest["statistics"]["scaling_factor"])


def _by_bucket(samples: Iterator[dict], batch_size: int, drop_last: bool) -> Iterator[dict[str, Any]]:
    """Group samples by latent shape; a batch leaves as soon as its bucket holds batch_size samples."""
    pending: dict[tuple[int, ...], list[dict]] = {}
    for s in samples:
        group = pending.setdefault(tuple(s["latent"].shape), [])
        group.append(s)
        if len(group) == batch_size:
            yield _collate(group)
            group.clear()
    for group in pending.values():
        if group and not drop_last:
            yield _collate(group)


def _collate(group: list[dict]) -> dict[str, Any]:
    names = sorted({n for s in group for n in s} - {"latent"})
    batch: dict[str, Any] = {n: [s.get(n) for s in group] for n in names}
    batch["latent"] = torch.stack([s["latent"] for s in group])  # (B, C, h, w)
    return batch
