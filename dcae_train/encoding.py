"""The pipeline of `encode_dataset`: work units, crops in the DataLoader workers, batched encoding, the shard writer.

A unit is one output shard: one input shard, or a run of images of a folder. A DataLoader worker takes whole units
and turns each into batches of uint8 crops of one bucket (the square evaluation crop, or the nearest aspect-ratio
bucket), then an end marker with its counts and skipped samples; the main process encodes each batch and appends the
latents to the unit's shard, which is renamed into place at the end marker, after its record. A unit's batches depend
only on the unit, so its shard has the same bytes whatever the worker count, world size or interruptions.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset
from webdataset.tariterators import tarfile_samples

from dcae_train.data.buckets import Bucket, cover_box, cover_scale, nearest_bucket
from dcae_train.data.latents import LATENT_FORMATS, META_FIELD, latent_to_bytes
from dcae_train.data.shards import ShardWriter, write_atomic
from dcae_train.data.specs import REMOTE_PREFIXES, sources_from_spec
from dcae_train.data.transforms import (
    IMAGE_KEYS,
    SWAPS_SIDES,
    BadSample,
    TransformSpec,
    draft,
    image_bytes,
    open_checked,
    orientation,
    oriented_rgb,
)
from dcae_train.data.webdataset import worker_slot
from dcae_train.evaluation.data import adm_center_crop, adm_crop_box, resolve_data
from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.models import DCAE

PREFIX = "latents"
CAPTION_SUFFIXES = (".txt", ".json")  # files beside a folder image with its stem: passed through as fields
RESERVED = (*LATENT_FORMATS, META_FIELD)  # fields we write; a source field of the same name is replaced


# Ranks and device ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype


# Work units: one output shard each -----------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    index: int
    kind: str  # "shard" (one input shard) | "files" (images of a folder)
    sources: tuple[str, ...]
    root: str = ""  # files: the folder their keys are relative to
    first: int = 0  # files: global index of the first image (its output key)

    @property
    def name(self) -> str:
        return f"{PREFIX}-{self.index:06d}.tar"

    @property
    def record(self) -> str:
        return f"{PREFIX}-{self.index:06d}.json"


def make_units(spec: str, per_shard: int) -> list[Unit]:
    """--data -> units in a fixed order: one per input shard, or per `per_shard` images of a folder (sorted)."""
    if spec.startswith(REMOTE_PREFIXES) or "::" in spec:
        urls = sources_from_spec(spec, "--data")[0].urls
        return [Unit(i, "shard", (u,)) for i, u in enumerate(urls)]
    data = resolve_data(spec)
    if data.kind == "shards":
        return [Unit(i, "shard", (str(f),)) for i, f in enumerate(data.files)]
    files, root = [str(f) for f in data.files], data.root if Path(data.root).is_dir() else "/"
    starts = range(0, len(files), per_shard)
    return [Unit(i, "files", tuple(files[s : s + per_shard]), root, s) for i, s in enumerate(starts)]


def data_fingerprint(units: list[Unit]) -> str:
    """Identifies the input split into units: a rerun on changed data would mix two datasets."""
    h = hashlib.sha256(json.dumps([[u.kind, *u.sources] for u in units]).encode())
    return h.hexdigest()[:16]


def unit_samples(unit: Unit, on_error) -> Iterator[dict]:
    """The raw samples of a unit: tar members grouped by key, or folder images with the caption files beside them."""
    if unit.kind == "shard":
        yield from tarfile_samples([{"url": unit.sources[0]}], handler=on_error)
        return
    for j, file in enumerate(unit.sources):
        path = Path(file)
        sample: dict[str, Any] = {"__key__": f"{unit.first + j:09d}", "__url__": file, "__path__": path}
        sample["__source__"] = os.path.relpath(path, unit.root)
        for suffix in CAPTION_SUFFIXES:
            if path.with_suffix(suffix).is_file():
                sample[suffix[1:]] = path.with_suffix(suffix).read_bytes()
        yield sample


# Crops (in the DataLoader workers) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the workers do to each image."""

    resolution: int
    buckets: tuple[Bucket, ...] | None  # None: the square evaluation crop
    small_images: str
    batch_size: int
    tile_above: int
    limits: TransformSpec  # header checks: max_pixels, max_aspect


def prepare(sample: dict, plan: Plan) -> tuple[torch.Tensor, dict]:
    """A source sample -> (uint8 crop (3, h, w), its latent.json). Raises BadSample for anything unusable."""
    im = open_checked(_image_of(sample), plan.limits)
    w, h = im.size[::-1] if orientation(im) in SWAPS_SIDES else im.size  # sizes and boxes as the image is seen
    r = plan.resolution
    bucket = (r, r) if plan.buckets is None else nearest_bucket(w, h, plan.buckets)
    if cover_scale(w, h, bucket) > 1 and plan.small_images == "skip":
        raise BadSample("too_small", f"{w}x{h} would be upsampled to {bucket[1]}x{bucket[0]} (--small-images skip)")
    if plan.buckets is None:
        box = adm_crop_box((w, h), r)
        crop = _decoded(lambda: adm_center_crop(im, r))  # exactly the evaluation crop (EXIF orientation applied)
    else:
        box = cover_box(w, h, bucket)
        crop = _decoded(lambda: _bucket_crop(im, box, bucket))
    x = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, h, w)
    meta = {"key": sample.get("__source__", sample["__key__"]), "source": sample.get("__url__", ""), "width": w,
            "height": h, "crop_box": [round(v, 3) for v in box], "bucket": list(bucket),
            "tiled": bucket[0] * bucket[1] > plan.tile_above}  # fmt: skip
    return x, meta


def _image_of(sample: dict) -> bytes:
    if "__path__" not in sample:
        return image_bytes(sample)
    try:
        return sample["__path__"].read_bytes()
    except OSError as e:
        raise BadSample("unreadable_file", str(e)) from None


def _bucket_crop(im: Image.Image, box: tuple[float, float, float, float], bucket: Bucket) -> Image.Image:
    """One BICUBIC resize of the box to the bucket; JPEGs decoded at reduced scale when shrunk 2x or more."""
    div = draft(im, (box[2] - box[0]) / bucket[1])
    rgb = oriented_rgb(im)  # decodes; EXIF orientation applied (draft scales both sides alike)
    w, h = rgb.size  # drafted: ceil(W / div); clamp the far edges against round-off
    scaled = (box[0] / div, box[1] / div, min(box[2] / div, w), min(box[3] / div, h))
    return rgb.resize((bucket[1], bucket[0]), Image.Resampling.BICUBIC, box=scaled)


def _decoded(make):
    try:
        return make()
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for truncated or corrupt data
        raise BadSample("undecodable", f"{type(e).__name__}: {e}") from None


def passthrough(sample: dict) -> dict[str, bytes]:
    """Every field but the image, WebDataset's own and ours."""
    return {k: v for k, v in sample.items() if not k.startswith("__") and k not in IMAGE_KEYS and k not in RESERVED}


class UnitStream(IterableDataset):
    """Batches of crops of one bucket, unit by unit; each worker takes every num_workers-th unit, whole, so a unit's
    batches (and so its latents) are the same whatever the worker count. After a unit's batches comes its end."""

    def __init__(self, units: list[Unit], plan: Plan) -> None:
        self.units, self.plan = units, plan

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = worker_slot()
        for unit in self.units[worker::num_workers]:
            yield from unit_batches(unit, self.plan)


def unit_batches(unit: Unit, plan: Plan) -> Iterator[dict]:
    skipped: list[dict] = []
    pending: dict[Bucket, list] = {}
    read = 0

    def on_error(e: Exception) -> bool:  # a shard that cannot be opened or read on: counted, never fatal
        skipped.append({"key": None, "reason": "shard_error", "detail": f"{type(e).__name__}: {e}"})
        return True

    for sample in unit_samples(unit, on_error):
        read += 1
        try:
            x, meta = prepare(sample, plan)
        except BadSample as e:
            key = sample.get("__source__", sample.get("__key__"))
            skipped.append({"key": key, "reason": e.reason, "detail": str(e)})
            continue
        item = (sample["__key__"], x, meta, passthrough(sample))
        if meta["tiled"]:  # alone: the tiled encoder bounds the memory of one image, not of a batch
            yield _batch(unit, [item])
            continue
        group = pending.setdefault(tuple(meta["bucket"]), [])
        group.append(item)
        if len(group) == plan.batch_size:
            yield _batch(unit, group)
            group.clear()
    for bucket in sorted(pending):
        if pending[bucket]:
            yield _batch(unit, pending[bucket])
    yield {"unit": unit.index, "end": True, "read": read, "skipped": skipped}


def _batch(unit: Unit, items: list) -> dict:
    return {"unit": unit.index, "keys": [k for k, _, _, _ in items], "images": torch.stack([x for _, x, _, _ in items]),
            "meta": [m for _, _, m, _ in items], "fields": [f for _, _, _, f in items]}  # fmt: skip


# Encoding and writing (in the main process) ------------------------------------------------------------
@dataclass(frozen=True)
class EncodeOptions:
    out: Path
    fmt: str  # npy | safetensors
    latent_dtype: torch.dtype  # as stored
    tile: int  # px, for the crops the workers marked `tiled`
    num_workers: int
    latent_channels: int | None = None  # DC-AE 1.5: store only this channel prefix (None: the full latent)


def encode_latents(model: DCAE, x: torch.Tensor, tiled: bool, tile: int, latent_channels: int | None = None):
    """The one call into the encoder; `latent_channels` is DC-AE 1.5's prefix (the first c filters only)."""
    if tiled:
        return model.tiled_encode(x, tile=tile, latent_channels=latent_channels)
    return model.encode(x, latent_channels=latent_channels)


def encode_batch(
    model: DCAE, images: torch.Tensor, ranks: Ranks, tiled: bool, tile: int, latent_channels: int | None = None
) -> torch.Tensor:
    """uint8 (B, 3, h, w) -> float32 latents (B, C, h/f, w/f); the image scaling is the evaluation's ToTensor."""
    x = images.to(ranks.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    with torch.inference_mode(), torch.autocast(ranks.device.type, ranks.dtype, enabled=ranks.dtype != torch.float32):
        z = encode_latents(model, x, tiled, tile, latent_channels)
    return z.float()


class UnitWriter:
    """One output shard in the making: members in arrival order and the latent sums, then record + rename."""

    def __init__(self, opts: EncodeOptions, unit: Unit) -> None:
        self.opts, self.unit = opts, unit
        self.shard = ShardWriter(opts.out / unit.name)
        self.stats: LatentAccumulator | None = None
        self.buckets: dict[str, int] = {}
        self.written = 0

    def add(self, z: torch.Tensor, batch: dict) -> None:
        z = z.to(self.opts.latent_dtype).cpu()  # the statistics describe the latents as stored
        self.stats = self.stats or LatentAccumulator(z.shape[1])
        self.stats.update(z)
        fmt = self.opts.fmt
        for i, key in enumerate(batch["keys"]):
            self.shard.add(f"{key}.{fmt}", latent_to_bytes(z[i], fmt))
            self.shard.add(f"{key}.{META_FIELD}", json.dumps(batch["meta"][i], sort_keys=True).encode())
            for name, payload in sorted(batch["fields"][i].items()):
                self.shard.add(f"{key}.{name}", payload)
            bucket = "x".join(map(str, batch["meta"][i]["bucket"]))
            self.buckets[bucket] = self.buckets.get(bucket, 0) + 1
        self.written += len(batch["keys"])

    def finish(self, end: dict) -> None:
        """Record first, shard last: a shard under its final name always has its record beside it."""
        unit = self.unit
        record = {"shard": unit.name, "sources": list(unit.sources) if unit.kind == "shard" else [],
                  "files": len(unit.sources) if unit.kind == "files" else 0, "read": end["read"],
                  "samples": self.written, "skipped": end["skipped"], "buckets": dict(sorted(self.buckets.items())),
                  "stats": self.stats.state() if self.stats else None}  # fmt: skip
        write_atomic(self.opts.out / unit.record, json.dumps(record, indent=1).encode())
        self.shard.commit()


def encode_units(model: DCAE, units: list[Unit], plan: Plan, opts: EncodeOptions, ranks: Ranks, progress) -> int:
    """Encode `units` (this rank's unfinished ones) into their shards; returns the number of latents written."""
    workers = min(opts.num_workers, len(units))
    loader = DataLoader(UnitStream(units, plan), batch_size=None, num_workers=workers,
                        pin_memory=ranks.device.type == "cuda")  # fmt: skip
    by_index = {u.index: u for u in units}
    writers: dict[int, UnitWriter] = {}
    written = 0
    try:
        for batch in loader:
            if batch["unit"] not in writers:
                writers[batch["unit"]] = UnitWriter(opts, by_index[batch["unit"]])
            if batch.get("end"):
                writers.pop(batch["unit"]).finish(batch)
                progress.shard_done(batch["read"], len(batch["skipped"]))
                continue
            z = encode_batch(model, batch["images"], ranks, batch["meta"][0]["tiled"], opts.tile, opts.latent_channels)
            writers[batch["unit"]].add(z, batch)
            written += len(batch["keys"])
            progress.update(len(batch["keys"]))
    finally:
        for writer in writers.values():  # interrupted: drop the partial shards (a rerun would redo them anyway)
            writer.shard.abort()
    return written


def is_done(out: Path, unit: Unit) -> bool:
    return (out / unit.name).is_file() and (out / unit.record).is_file()


def weights_digest(model: DCAE) -> str:
    """SHA-256 of the architecture and every tensor: the same checkpoint under another path has the same digest."""
    config = model.config.replace(gradient_checkpointing=False).to_dict()
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]
