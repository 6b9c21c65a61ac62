#!/usr/bin/env python
"""Latent-dataset throughput: `python -m dcae_train.encode_dataset` against a plain loop, same model, same crops.

  ours        the tool as shipped: DataLoader workers decode and crop, batches of one bucket, autocast on GPU,
              shards written atomically with per-shard statistics
  plain loop  what one writes by hand: read the tar, PIL decode + resize + centre crop, `AutoencoderDC.encode` one
              image at a time, `np.save` each latent

Both read the same shards and encode with the same weights (our random-init model exported once and loaded by both,
ours with `load_model`, the loop with `AutoencoderDC.from_pretrained`), in the same precision. Runs of ours and the
loop alternate so machine load hits both alike, after one untimed warm-up run of each; the table quotes medians over
--reps runs, timed from the first image read to the last latent written (model loading excluded).

    python scripts/bench_encode.py                          # CPU: tiny variant; demo data at 256 px, photos at 512 px
    python scripts/bench_encode.py --device cuda --variant dc-ae-f32c32-sana-1.1 --synthetic 512
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dcae_train.data import demo_shards  # noqa: E402
from dcae_train.data.buckets import cover_box, nearest_bucket, sana_buckets  # noqa: E402
from dcae_train.data.shards import ShardWriter  # noqa: E402
from dcae_train.data.specs import expand_urls  # noqa: E402
from dcae_train.encode_dataset import parse_args, run, setup  # noqa: E402
from dcae_train.models import DCAE, variant_config  # noqa: E402
from dcae_train.weights import export_diffusers  # noqa: E402

ASPECTS = [(4, 3), (3, 2), (1, 1), (2, 3), (16, 9)]  # (width, height) shapes of the synthetic photos


# Data ---------------------------------------------------------------------------------------------------
def synthetic_shards(folder: Path, count: int, long_side: int, per_shard: int = 16) -> list[str]:
    """Photo-like JPEGs (scikit-image's photographs resized, plus sensor noise) of several aspect ratios."""
    names = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
    photos = [Image.open(Path(skimage.data.__file__).parent / n).convert("RGB") for n in names]
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        size = (long_side, round(long_side * ah / aw)) if aw >= ah else (round(long_side * aw / ah), long_side)
        im = np.asarray(photos[i % len(photos)].resize(size, Image.Resampling.BILINEAR), dtype=np.int16)
        noisy = np.clip(im + rng.normal(0, 4, im.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
        samples.append((f"photo{i:05d}", buf.getvalue()))
    return write(folder, samples, per_shard)


def demo_subset(folder: Path, count: int, per_shard: int = 48) -> list[str]:
    """The first `count` images of the embedded demo dataset's training shards (all 384 by default)."""
    samples = []
    for url in expand_urls(demo_shards()["train"]):
        with tarfile.open(url) as tar:
            samples += [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar if m.name.endswith(".jpg")]
    return write(folder, samples[:count], per_shard)


def write(folder: Path, samples: list[tuple[str, bytes]], per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(0, len(samples), per_shard):
        writer = ShardWriter(folder / f"src-{s // per_shard:06d}.tar")
        for key, data in samples[s : s + per_shard]:
            writer.add(f"{key}.jpg", data)
        writer.commit()
        urls.append(str(writer.path))
    return urls


# The two pipelines --------------------------------------------------------------------------------------
def ours(model_dir: Path, shards: Path, out: Path, a: argparse.Namespace, res: int, buckets: bool) -> float:
    """Seconds of `run` (set-up, the model load among it, is not timed)."""
    argv = ["--model", str(model_dir), "--data", str(shards), "--out", str(out), "--resolution", str(res),
            "--batch-size", str(a.batch_size), "--num-workers", str(a.num_workers), "--device", a.device,
            "--no-progress", *(["--buckets", "sana"] if buckets else [])]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        job = setup(parse_args(argv))
        t0 = time.perf_counter()
        run(job)
    return time.perf_counter() - t0


def plain_crop(im: Image.Image, res: int, table) -> Image.Image:
    """Resize to cover the target (square, or the nearest bucket), BICUBIC, then the centred crop."""
    w, h = im.size
    bh, bw = (res, res) if table is None else nearest_bucket(w, h, table)
    return im.resize((bw, bh), Image.Resampling.BICUBIC, box=cover_box(w, h, (bh, bw)))


@torch.no_grad()
def plain_loop(model, urls: list[str], out: Path, res: int, table, device: str, dtype: torch.dtype) -> float:
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar:
                im = plain_crop(Image.open(tar.extractfile(m)).convert("RGB"), res, table)
                x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].to(device).float() / 127.5 - 1
                with torch.autocast(x.device.type, dtype, enabled=dtype != torch.float32):
                    z = model.encode(x).latent
                np.save(out / f"{m.name.split('.')[0]}.npy", z[0].float().cpu().numpy())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


# Measurement --------------------------------------------------------------------------------------------
def bench(a, model: tuple, shards: Path, count: int, res: int, buckets: bool, tmp: Path) -> dict:
    model_dir, reference, f = model
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32  # the tool's default on each device
    table = sana_buckets(res, f) if buckets else None
    times: dict[str, list[float]] = {"ours": [], "plain": []}
    for rep in range(a.reps + 1):  # run 0 warms up both (first calls per shape, page faults) and is not counted
        for name in ("ours", "plain") if rep % 2 == 0 else ("plain", "ours"):  # alternating which goes first
            out = tmp / f"out-{shards.name}-{buckets}-{name}-{rep}"
            if name == "ours":
                seconds = ours(model_dir, shards, out, a, res, buckets)
            else:
                seconds = plain_loop(reference, urls, out, res, table, a.device, dtype)
            times[name] += [seconds] if rep else []
    return {k: count / statistics.median(v) for k, v in times.items()} | {"runs": times}


def build(a: argparse.Namespace, tmp: Path) -> tuple:
    """(folder, diffusers model, compression): our random-init model exported once, AutoencoderDC loads it."""
    from diffusers import AutoencoderDC

    config = variant_config(a.variant)
    config = config if a.width == 1 else config.scaled(a.width)
    torch.manual_seed(0)
    model_dir = export_diffusers(DCAE(config), tmp / "model")
    reference = AutoencoderDC.from_pretrained(model_dir).to(a.device).eval()
    return model_dir, reference, config.spatial_compression_ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variant", default=None, help="default: tiny on CPU, dc-ae-f32c32-sana-1.1 on GPU")
    p.add_argument("--width", type=float, default=1.0, help="model width multiplier (DCAEConfig.scaled)")
    p.add_argument("--demo-images", type=int, default=384, help="images of the demo data (0: skip)")
    p.add_argument("--demo-resolution", type=int, default=256, help="the demo crops are 256-448 px")
    p.add_argument("--synthetic", type=int, default=64, help="synthetic photos (0: skip)")
    p.add_argument("--synthetic-size", type=int, default=2048, help="long side of the synthetic photos, px")
    p.add_argument("--resolution", type=int, default=512, help="crop of the synthetic photos")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    a.variant = a.variant or ("dc-ae-f32c32-sana-1.1" if a.device.startswith("cuda") else "tiny")
    with tempfile.TemporaryDirectory(prefix="dcae_bench_encode_") as name:
        tmp = Path(name)
        model = build(a, tmp)
        cases = []
        if a.demo_images:
            demo_subset(tmp / "demo", a.demo_images)
            cases.append(("demo crops (256-448 px)", tmp / "demo", a.demo_images, a.demo_resolution, False))
        if a.synthetic:
            synthetic_shards(tmp / "photos", a.synthetic, a.synthetic_size)
            label = f"synthetic photos (long side {a.synthetic_size} px)"
            cases += [(label, tmp / "photos", a.synthetic, a.resolution, False),
                      (label, tmp / "photos", a.synthetic, a.resolution, True)]  # fmt: skip
        report(a, [(c, bench(a, model, *c[1:], tmp)) for c in cases])
    return 0


def report(a: argparse.Namespace, rows: list) -> None:
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    width = "" if a.width == 1 else f" at width x{a.width}"
    print(f"# bench_encode: {a.variant}{width}, random weights, {device}, batch {a.batch_size}, "
          f"{a.num_workers} workers (ours), median of {a.reps}\n")  # fmt: skip
    print("| data | images | crop | ours (img/s) | plain loop (img/s) | ratio |")
    print("|---|---|---|---|---|---|")
    for (label, _, count, res, buckets), r in rows:
        crop = f"SANA buckets at {res}^2 px" if buckets else f"{res} px square"
        print(f"| {label} | {count} | {crop} | {r['ours']:.1f} | {r['plain']:.1f} | {r['ours'] / r['plain']:.2f}x |")
    print("\nseconds per run (ours | plain loop):")
    for (label, _, _, _, buckets), r in rows:
        runs = " | ".join(" ".join(f"{v:.2f}" for v in r["runs"][k]) for k in ("ours", "plain"))
        print(f"- {label}, {'buckets' if buckets else 'square'}: {runs}")


if __name__ == "__main__":
    sys.exit(main())
