"""Evaluation images: an image folder or WebDataset shards, ADM centre-cropped, split across ranks.

The crop is the one of the official evaluator (ADM / guided-diffusion `center_crop_arr`, docs/evaluation.md):
BOX-halve while the short side is >= 2 * res, BICUBIC-resize the short side to res, centre crop.
Each item is `{"image": (3, res, res) float in [-1, 1], "__key__": str}`.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from dcae_train.data.transforms import oriented_rgb
from dcae_train.data.webdataset import SignalProofDataLoader

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


# ADM centre crop ----------------------------------------------------------------------------------------
def adm_plan(size: tuple[int, int], res: int) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The steps of `adm_center_crop` for an image of `size` (w, h): (number of 2x BOX halvings, (w, h) after the
    BICUBIC resize, (left, top) of the res x res crop)."""
    w, h = size
    if res < 1 or min(w, h) < 1:  # the halving loop below would never end on a resolution <= 0
        raise ValueError(f"cannot centre-crop a {w}x{h} image to {res}x{res}: both need at least one pixel")
    halvings = 0
    while min(w, h) >= 2 * res:  # repeated 2x BOX downsampling: antialiased and cheap
        w, h, halvings = w // 2, h // 2, halvings + 1
    scale = res / min(w, h)
    w, h = round(w * scale), round(h * scale)
    return halvings, (w, h), ((w - res) // 2, (h - res) // 2)


def adm_center_crop(img: Image.Image, res: int) -> Image.Image:
    """PIL image -> res x res RGB, as guided-diffusion's centre crop (the DC-AE evaluation crop)."""
    img = oriented_rgb(img)  # EXIF orientation, 16-bit scaling, transparency: as in training
    halvings, resized, (left, top) = adm_plan(img.size, res)
    for _ in range(halvings):
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    img = img.resize(resized, resample=Image.BICUBIC)
    return img.crop((left, top, left + res, top + res))


def adm_crop_box(size: tuple[int, int], res: int) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the original image's pixels of the region `adm_center_crop` keeps."""
    _, (w2, h2), (left, top) = adm_plan(size, res)
    sx, sy = size[0] / w2, size[1] / h2
    return left * sx, top * sy, (left + res) * sx, (top + res) * sy


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float() / 127.5 - 1.0


def load_image(data: bytes | Path, res: int) -> torch.Tensor:
    src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    with Image.open(src) as im:
        return to_tensor(adm_center_crop(im, res))


# Sources ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalData:
    """A resolved data source: either image files or tar shards (never both)."""

    kind: str  # "folder" | "shards"
    files: tuple[Path, ...]
    root: str

    def fingerprint(self) -> str:
        """Identifies the dataset for the reference-statistics cache: names, sizes and mtimes of all files."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns]).encode())
        return h.hexdigest()[:16]


def resolve_data(source: str) -> EvalData:
    """A folder of images (searched recursively), a folder of .tar shards, a glob, or a brace pattern."""
    path = Path(source)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards:
            return EvalData("shards", tuple(shards), source)
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"data={source!r} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no .tar shards")
        return EvalData("folder", tuple(images), source)
    files = sorted(Path(p) for pat in _expand_braces(source) for p in glob.glob(pat))
    if not files:
        raise ValueError(f"data={source!r} matches no files: give an image folder, a shard folder or a shard pattern")
    if all(f.suffix == ".tar" for f in files):
        return EvalData("shards", tuple(files), source)
    return EvalData("folder", tuple(f for f in files if f.suffix.lower() in IMAGE_SUFFIXES), source)


def _expand_braces(pattern: str) -> list[str]:
    return list(braceexpand.braceexpand(pattern))


# Iteration ----------------------------------------------------------------------------------------------
class _FolderDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], root: Path, res: int) -> None:
        self.files, self.root, self.res = files, root, res

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        f = self.files[i]
        key = str(f.relative_to(self.root)) if f.is_relative_to(self.root) else str(f)
        return _sample(lambda: load_image(f, self.res), key)


class _ShardDataset(torch.utils.data.IterableDataset):
    """Plain tar reading (webdataset's tar iterator): deterministic order, shards split over ranks and workers."""

    def __init__(self, shards: list[Path], res: int, limit: int | None) -> None:
        self.shards, self.res, self.limit = shards, res, limit

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        mine = [{"url": str(s)} for s in self.shards[wid::nw]]
        for count, sample in enumerate(group_by_keys(tar_file_expander(url_opener(mine)))):
            if self.limit is not None and count >= self.limit:
                return
            key = next((k for k in SHARD_IMAGE_KEYS if k in sample), None)
            name = f"{sample.get('__url__')}:{sample.get('__key__')}"
            if key is None:
                yield {"image": None, "__key__": str(sample["__key__"]), "bad": f"{name}: no image member"}
                continue
            yield _sample(lambda s=sample, k=key: load_image(s[k], self.res), str(sample["__key__"]), name)


def _sample(load, key: str, name: str | None = None) -> dict:
    """One sample, or a marked bad one: a corrupt image or a decompression bomb is skipped and counted, like in
    training, never the end of an evaluation. PIL raises many types for bad bytes, hence the broad except."""
    try:
        return {"image": load(), "__key__": key}
    except Exception as err:
        return {"image": None, "__key__": key, "bad": f"{name or key}: {type(err).__name__}: {err}"}


def collate_good(items: list[dict]) -> dict:
    """Batch the readable samples; `skipped` lists what was dropped (the loop counts and reports it)."""
    good = [it for it in items if it["image"] is not None]
    images = torch.stack([it["image"] for it in good]) if good else torch.empty(0)
    return {"image": images, "__key__": [it["__key__"] for it in good], "skipped": [it["bad"] for it in items
            if it["image"] is None]}  # fmt: skip


def eval_loader(
    data: EvalData,
    res: int,
    batch_size: int,
    num_workers: int = 2,
    num_images: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.utils.data.DataLoader:
    """This rank's share of the first `num_images` images (all when None), in a fixed order."""
    if res < 1:  # said here, not by every worker on every image
        raise ValueError(f"resolution={res}: give a positive image side in pixels, e.g. 256")
    if data.kind == "folder":
        files = list(data.files[:num_images] if num_images else data.files)
        root = Path(data.root) if Path(data.root).is_dir() else Path("/")
        ds: torch.utils.data.Dataset = _FolderDataset(files[rank::world_size], root, res)
        return SignalProofDataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_good)
    shards = list(data.files[rank::world_size])
    if not shards:
        raise ValueError(f"{len(data.files)} shards for {world_size} ranks: each rank needs at least one shard")
    num_workers = min(num_workers, len(shards))  # a worker without a shard would yield nothing
    # An exact per-rank quota needs equal shards; per worker we cap at ceil(quota / workers) (upper bound).
    limit = None
    if num_images:
        quota = -(-num_images // world_size)
        limit = -(-quota // max(num_workers, 1))
    ds = _ShardDataset(shards, res, limit)
    return SignalProofDataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_good)
