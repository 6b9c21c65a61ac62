#!/usr/bin/env python
"""Data-loading throughput: our stream vs a naive baseline, on JPEGs of typical photo sizes (made here).

Both read the same shards with the same per-worker shard split and batch inside the workers; they differ in
what happens to each image:
  ours      header-first crop planning + reduced-scale JPEG decoding (DCT scaling) + one PIL resize with a box
  baseline  full PIL decode + convert("RGB") + torchvision Resize / CenterCrop / RandomHorizontalFlip /
            ToTensor / Normalize (the usual `wds.decode("pil")` + torchvision pipeline)
The crop is the same for both (ADM: short side -> R, centre crop). Runs of ours and the baseline alternate in
one loop so machine load hits both alike; the table quotes medians over --reps runs.

    python scripts/bench_data.py                 # 256 and 1024 px, 1 and 2 workers
    python scripts/bench_data.py --reps 5 --images 96
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import IterableDataset  # noqa: E402

from dcae_train.data.shards import write_shards  # noqa: E402
from dcae_train.data.transforms import TransformSpec  # noqa: E402
from dcae_train.data.webdataset import (  # noqa: E402
    SkipCounter,
    Source,
    StreamLoader,
    TrainStream,
    _endless_samples,
    worker_slot,
)

PHOTO_SIZES = [(4032, 3024), (3000, 2000), (2048, 1536), (1600, 1200)]  # phone, DSLR, web-sized photos


# Test images -------------------------------------------------------------------------------------


def make_photos(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Photo-like JPEGs: scikit-image sample photographs, resized to typical camera sizes, plus sensor noise."""
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    sources = [Image.open(folder / f).convert("RGB") for f in ("astronaut.png", "coffee.png", "chelsea.png",
                                                                 "rocket.jpg", "motorcycle_left.png")]  # fmt: skip
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = PHOTO_SIZES[i % len(PHOTO_SIZES)]
        im = np.asarray(sources[i % len(sources)].resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
        im = np.clip(im + rng.normal(0, 4, im.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=90)
        out.append((f"photo_{i}", buf.getvalue()))
    return out


# The naive baseline ----------------------------------------------------------------------------------


class NaiveStream(IterableDataset):
    """Same shard reading and batching as TrainStream; full decode + torchvision transforms per image."""

    def __init__(self, urls: tuple[str, ...], resolution: int, batch_size: int) -> None:
        self.urls, self.resolution, self.batch_size = urls, resolution, batch_size

    def __iter__(self):
        import torchvision.transforms as T

        worker, num_workers = worker_slot()
        tf = T.Compose([T.Resize(self.resolution), T.CenterCrop(self.resolution), T.RandomHorizontalFlip(),
                        T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # fmt: skip
        urls = self.urls[worker::num_workers] if len(self.urls) >= num_workers else self.urls
        batch = []
        counter = SkipCounter("baseline", 60.0)
        for sample in _endless_samples(urls, random.Random(worker), counter):
            batch.append(tf(Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            if len(batch) == self.batch_size:
                yield {"image": torch.stack(batch), "skipped": torch.tensor(0), "worker": torch.tensor(worker)}
                batch = []


# Measurement ------------------------------------------------------------------------------------------


def images_per_s(dataset: IterableDataset, workers: int, batches: int, batch_size: int) -> float:
    """Throughput after the first batch (worker start-up and the first decode are not counted)."""
    loader = StreamLoader(dataset, num_workers=workers, length=batches + 1, prefetch_factor=2)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n * batch_size / (time.perf_counter() - t0)


def bench(urls: tuple[str, ...], resolution: int, workers: int, reps: int, images: int, batch_size: int) -> dict:
    spec = TransformSpec(resolution=resolution, crop="center", flip=True, small_images="upsample")
    make = {
        "ours": lambda: TrainStream([Source(urls)], spec, batch_size=batch_size, shuffle_buffer=1),
        "baseline": lambda: NaiveStream(urls, resolution, batch_size),
    }
    results: dict[str, list[float]] = {"ours": [], "baseline": []}
    batches = max(1, images // batch_size)
    for rep in range(reps):
        order = ["ours", "baseline"] if rep % 2 == 0 else ["baseline", "ours"]  # interleaved, alternating first
        for name in order:
            results[name].append(images_per_s(make[name](), workers, batches, batch_size))
    return {name: statistics.median(v) for name, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3, help="runs per pipeline and setting (median reported)")
    p.add_argument("--images", type=int, default=64, help="images timed per run (after the first batch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--photos", type=int, default=16, help="distinct JPEGs written to the benchmark shards")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="dcae_bench_data_") as tmp:
        t0 = time.perf_counter()
        photos = make_photos(a.photos)
        report = write_shards(photos, tmp, samples_per_shard=max(1, a.photos // 4), progress=False)
        urls = tuple(str(Path(tmp) / s["name"]) for s in report.shards)
        sizes = sorted({f"{w}x{h}" for w, h in PHOTO_SIZES[: a.photos]})
        mean_kb = sum(len(b) for _, b in photos) / len(photos) / 1024
        print(f"{len(photos)} JPEGs ({', '.join(sizes)}; q90, mean {mean_kb:.0f} KiB) in {len(urls)} shards, "
              f"made in {time.perf_counter() - t0:.1f} s; median of {a.reps} interleaved runs, "
              f"{a.images} images each, batch {a.batch_size}")  # fmt: skip
        print()
        print("| crop px | workers | ours img/s | baseline img/s | ours / baseline |")
        print("|---:|---:|---:|---:|---:|")
        for res in a.resolutions:
            for workers in a.workers:
                r = bench(urls, res, workers, a.reps, a.images, a.batch_size)
                ratio = r["ours"] / r["baseline"]
                print(f"| {res} | {workers} | {r['ours']:.1f} | {r['baseline']:.1f} | {ratio:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
