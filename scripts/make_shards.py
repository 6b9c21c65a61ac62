#!/usr/bin/env python
"""Image folder or file list -> WebDataset shards + manifest.json.

    python scripts/make_shards.py /data/imagenet/train shards/imagenet-train --samples-per-shard 1000 --max-side 1024
    python scripts/make_shards.py files.txt shards/mine --prefix train      # one image path per line

Importable: `from scripts.make_shards import make_shards` (or `dcae_train.data.shards.write_shards`).
Existing shards are never overwritten unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dcae_train.data.shards import ShardReport, list_images, write_shards  # noqa: E402


def make_shards(
    source: str,
    out_dir: str,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    max_side: int | None = None,
    seed: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardReport:
    """Shard every image under `source` (a folder, recursively, or a text file of paths) into `out_dir`."""
    images = list_images(source)
    if not images:
        raise ValueError(f"no images found in {source!r} (looked for .jpg/.jpeg/.png/.webp/.bmp/.tif/.gif)")
    return write_shards(
        images, out_dir, samples_per_shard=samples_per_shard, prefix=prefix, max_side=max_side,
        shuffle_seed=seed, overwrite=overwrite, progress=progress,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder (recursive) or a text file with one image path per line")
    p.add_argument("out_dir", help="output folder for <prefix>-000000.tar ... and manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--prefix", default="shard", help="shard file prefix (no dots)")
    p.add_argument("--max-side", type=int, default=None, help="downscale images whose long side exceeds this")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed (-1 keeps the input order)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in out_dir")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        report = make_shards(
            a.source, a.out_dir, samples_per_shard=a.samples_per_shard, prefix=a.prefix, max_side=a.max_side,
            seed=None if a.seed < 0 else a.seed, overwrite=a.overwrite, progress=not a.no_progress,
        )  # fmt: skip
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{report.total} images in {len(report.shards)} shards: {report.pattern}")
    if report.skipped:
        print(f"skipped {len(report.skipped)} unreadable file(s); see {a.out_dir}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
