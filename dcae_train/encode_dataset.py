"""`python -m dcae_train.encode_dataset`: images (WebDataset shards or a folder) -> WebDataset shards of DC-AE latents.

    python -m dcae_train.encode_dataset --model runs/quickstart/phase3/<time>/checkpoints/final.ckpt \
        --data '/data/shards/train-{000000..000999}.tar' --out latents/train512 --resolution 512
    torchrun --nproc-per-node 8 -m dcae_train.encode_dataset --model ... --data ... --out ... --buckets sana

Input shard i (or images i*N..(i+1)*N-1 of a folder, N = --samples-per-shard) becomes `<out>/latents-<i>.tar`;
rank r of a torchrun job takes every world_size-th of them, so the ranks write disjoint shards and never talk to
each other. Each shard is written under a temporary name and renamed when complete, with a record of its counts and
latent sums beside it; a rerun skips the finished shards and redoes the partial ones. The process that completes the
last shard writes `manifest.json` and `latent_stats.npz`. Format and options: docs/latents.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dcae_train.data.buckets import Bucket, read_buckets
from dcae_train.data.latents import LATENT_FORMATS, MANIFEST, STATS_FILE
from dcae_train.data.shards import check_output_folder, write_atomic
from dcae_train.data.transforms import TransformSpec
from dcae_train.encoding import (
    PREFIX,
    EncodeOptions,
    Plan,
    Ranks,
    Unit,
    data_fingerprint,
    encode_units,
    is_done,
    make_units,
    weights_digest,
)
from dcae_train.evaluate import DTYPES, add_model_args, check_prefixes, load_eval_model
from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.models import DCAE
from dcae_train.models.tiling import DEFAULT_TILE
from dcae_train.schema import ConfigError

FORMAT = "dcae_train latents v1"
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# What decides the bytes of the shards: a rerun must match it (batch size and workers may change). The first group
# is known from the flags, so it is checked before the model loads; the second needs the model and the data.
ARG_SETTINGS = ("mode", "resolution", "small_images", "dtype", "latent_dtype", "format", "latent_channels", "tile",
                "tile_above", "samples_per_shard")  # fmt: skip
MODEL_SETTINGS = ("model_sha256", "data_sha256", "bucket_table")


# Arguments ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcae_train.encode_dataset", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder, folder of .tar shards, shard pattern or pipe: URL")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; a rerun resumes it)")
    p.add_argument("--resolution", type=int, default=512, help="square side, or the buckets' target sqrt(pixels)")
    p.add_argument("--buckets", default=None, help="aspect-ratio buckets: `sana` or a JSON file; default: square")
    p.add_argument("--small-images", choices=("skip", "upsample"), default="skip", help="images needing upsampling")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=4, help="DataLoader workers decoding images, per rank")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto", help="autocast; auto: bf16 on GPU")
    p.add_argument("--latent-dtype", choices=sorted(DTYPES), default="fp32", help="stored latents")
    p.add_argument("--format", choices=LATENT_FORMATS, default="npy", help="latent member: .npy or .safetensors")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="image folders: images per output shard")
    p.add_argument("--latent-channels", type=int, default=None, help="DC-AE 1.5: store only the first C channels")
    p.add_argument("--tile", type=int, default=DEFAULT_TILE, help="tile size (px) of the tiled encoder")
    p.add_argument("--tile-above", type=int, default=2048 * 2048, help="crops with more pixels are encoded tiled")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


# flag: (lowest value, a valid example)
MINIMUMS = {"resolution": (8, 512), "batch_size": (1, 16), "num_workers": (0, 4), "samples_per_shard": (1, 1000),
            "tile": (8, 512), "tile_above": (1, 2048 * 2048)}  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """Rules on the flags alone (no file is read): bad input stops here, with exit code 2."""
    for name, (low, example) in MINIMUMS.items():
        if getattr(args, name) < low:
            raise ConfigError(f"--{name.replace('_', '-')}", getattr(args, name), f"must be >= {low}", example)
    if args.format == "npy" and args.latent_dtype == "bf16":
        raise ConfigError("--latent-dtype", "bf16", ".npy has no bfloat16; add --format safetensors", "fp16")
    if args.buckets not in (None, "sana") and not Path(args.buckets).is_file():
        rule = "give `sana` or an existing JSON file of [[height, width], ...]"
        raise ConfigError("--buckets", args.buckets, rule, "sana")


# Ranks and device ---------------------------------------------------------------------------------------
def ranks_from_env(device: str, dtype: str) -> Ranks:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK. No process group: the ranks share nothing but the folder."""
    rank, world, local = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world = max(world, 1)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device("cuda", local) if device == "cuda" and world > 1 else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    return Ranks(rank, world, dev, DTYPES[dtype])


# Resuming and the manifest ------------------------------------------------------------------------------
def pending_units(out: Path, units: list[Unit], ranks: Ranks) -> list[Unit]:
    """This rank's units without a finished shard; their leftover temporary files (a killed run's) go first."""
    mine = units[ranks.rank :: ranks.world_size]
    for unit in mine:
        (out / f"{unit.name}.tmp").unlink(missing_ok=True)
    return [u for u in mine if not is_done(out, u)]


def read_settings(out: Path) -> dict | None:
    """The settings recorded in `out`, or None for a new folder; a folder with shards but no manifest is refused."""
    manifest = out / MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"--out={out}: {manifest} was not written by encode_dataset; choose another --out")
        return data["settings"]
    if out.is_dir() and any(out.glob(f"{PREFIX}-*.tar*")):
        raise ValueError(
            f"--out={out} holds {PREFIX}-*.tar shards but no {MANIFEST}; delete them or choose another --out"
        )
    return None


def check_settings(stored: dict | None, current: dict, keys, out: Path) -> None:
    """A rerun must make the same latents as the first run: another model, crop or dtype would mix two datasets."""
    if stored is None:
        return
    diff = [k for k in keys if stored.get(k) != current.get(k)]
    if diff:
        shown = "; ".join(f"{k}: {stored.get(k)!r} there, {current.get(k)!r} now" for k in diff)
        raise ValueError(f"--out={out} holds latents made with other settings ({shown}); rerun with the same "
                         "--model and options to resume, or choose another --out")  # fmt: skip


def finalize(out: Path, units: list[Unit], header: dict) -> dict | None:
    """When every unit is done: merge the records in unit order (the same sums at any world size), write the manifest
    and the per-channel statistics. Returns the manifest, or None while shards are missing (another rank's)."""
    if not all(is_done(out, u) for u in units):
        return None
    records = [json.loads((out / u.record).read_text()) for u in units]
    stats = None
    for r in records:
        if r["stats"]:
            part = LatentAccumulator.from_state(r["stats"])
            stats = stats.merge(part) if stats else part
    manifest = {**header, "status": "complete", **_counts(records)}
    manifest["statistics"] = stats.summary() if stats and stats.count else None
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    if manifest["statistics"]:
        _write_stats(out / STATS_FILE, manifest["statistics"])
    return manifest


def _counts(records: list[dict]) -> dict:
    """Totals over the shard records: samples, skipped ones (each with its shard and reason), buckets."""
    skipped = [{"shard": r["shard"], **s} for r in records for s in r["skipped"]]
    reasons = Counter(s["reason"] for s in skipped)
    buckets: Counter[str] = Counter()
    for r in records:
        buckets.update(r["buckets"])
    return {
        "pattern": f"{PREFIX}-{{000000..{len(records) - 1:06d}}}.tar",
        "samples": sum(r["samples"] for r in records),
        "read": sum(r["read"] for r in records),
        "skipped_count": len(skipped),
        "skipped_by_reason": dict(sorted(reasons.items())),
        "buckets": _bucket_list(buckets),
        "shards": [{"name": r["shard"], "samples": r["samples"]} for r in records],
        "skipped": skipped,
    }


def _bucket_list(buckets: dict[str, int]) -> list[dict]:
    rows = [(*map(int, b.split("x")), n) for b, n in buckets.items()]
    return [{"height": h, "width": w, "samples": n} for h, w, n in sorted(rows, key=lambda r: r[0] / r[1])]


def _write_stats(path: Path, summary: dict) -> None:
    """Per-channel mean, std and RMS (float64 arrays of C) and the scalar 1 / RMS, for trainers that want arrays."""
    arrays = {k: np.asarray(summary[f"per_channel_{k}"], dtype=np.float64) for k in ("mean", "std", "rms")}
    buf = io.BytesIO()
    np.savez(buf, **arrays, scaling_factor=np.float64(summary["scaling_factor"]))
    write_atomic(path, buf.getvalue())


# Set-up: every check before any encoding --------------------------------------------------------------
@dataclass
class Job:
    args: argparse.Namespace
    ranks: Ranks
    model: DCAE
    units: list[Unit]
    plan: Plan
    opts: EncodeOptions
    header: dict  # format, settings, model, data: the manifest's head


def setup(args: argparse.Namespace) -> Job:
    """Flags, the output folder's settings, the data, the model, then the model-dependent settings."""
    check_args(args)
    check_output_folder(args.out)  # a file, or no permission: said now, not after the model loads
    ranks = ranks_from_env(args.device, args.dtype)
    settings = {k: getattr(args, k, None) for k in ARG_SETTINGS}
    settings |= {"mode": "buckets" if args.buckets else "square", "dtype": DTYPE_NAMES[ranks.dtype]}
    stored = read_settings(args.out)
    check_settings(stored, settings, ARG_SETTINGS, args.out)  # before the model loads: cheap to learn
    units = make_units(args.data, args.samples_per_shard)
    model = load_eval_model(args.model, not args.raw, args.random_init, args.seed)
    table = _check_model_fit(model, args)
    settings |= {"model_sha256": weights_digest(model), "data_sha256": data_fingerprint(units),
                 "bucket_table": [list(b) for b in table] if table else None}  # fmt: skip
    check_settings(stored, settings, MODEL_SETTINGS, args.out)
    plan = Plan(args.resolution, table, args.small_images, args.batch_size, args.tile_above,
                TransformSpec(resolution=args.resolution))  # fmt: skip
    opts = EncodeOptions(args.out, args.format, DTYPES[args.latent_dtype], args.tile, args.num_workers,
                         args.latent_channels)  # fmt: skip
    header = {"format": FORMAT, "settings": settings, "model": model_info(model, args), "data": args.data}
    if stored is None:  # the first rank here writes it; never over a manifest another rank has since completed
        args.out.mkdir(parents=True, exist_ok=True)
        start = json.dumps({**header, "status": "incomplete"}, indent=1).encode()
        write_atomic(args.out / MANIFEST, start, replace=False)
    return Job(args, ranks, model, units, plan, opts, header)


def _check_model_fit(model: DCAE, args: argparse.Namespace) -> tuple[Bucket, ...] | None:
    """The bucket table (None: square crops); every size must be a multiple of the model's compression f."""
    f = model.spatial_compression_ratio
    if args.latent_channels is not None:
        try:
            check_prefixes(model, [args.latent_channels])
        except ValueError as e:
            raise ConfigError("--latent-channels", args.latent_channels, str(e), model.latent_channels) from None
    if args.tile % f:
        raise ConfigError("--tile", args.tile, f"must be a multiple of the model's spatial compression {f}", 512)
    if args.buckets:
        return read_buckets(args.buckets, args.resolution, f)
    if args.resolution % f:
        raise ConfigError("--resolution", args.resolution, f"must be a multiple of the model's compression {f}",
                          max(f, args.resolution // f * f))  # fmt: skip
    return None


def model_info(model: DCAE, args: argparse.Namespace) -> dict:
    weights = f"random (seed {args.seed})" if args.random_init else ("raw" if args.raw else "ema when present")
    return {
        "source": args.model,
        "weights": weights,
        "variant": model.variant,
        "scaling_factor": model.scaling_factor,
        "latent_channels": args.latent_channels or model.latent_channels,  # as stored (a 1.5 prefix or all)
        "model_latent_channels": model.latent_channels,
        "spatial_compression": model.spatial_compression_ratio,
    }


# Run ----------------------------------------------------------------------------------------------------
class Progress:
    """Images read (encoded or skipped) with images/s and ETA; for shards the total is estimated after each one."""

    def __init__(self, units: list[Unit], enabled: bool) -> None:
        known = all(u.kind == "files" for u in units)
        total = sum(len(u.sources) for u in units) if known else None
        self.bar = tqdm(total=total, unit="img", desc="encode", disable=not enabled, file=sys.stderr)
        self.known, self.units, self.done, self.read = known, len(units), 0, 0

    def update(self, n: int) -> None:
        self.bar.update(n)

    def shard_done(self, read: int, skipped: int) -> None:
        self.done, self.read = self.done + 1, self.read + read
        self.bar.update(skipped)
        if not self.known:
            self.bar.total = round(self.read / self.done * self.units)
        self.bar.set_postfix_str(f"shards {self.done}/{self.units}")


def run(job: Job) -> dict | None:
    """Encode this rank's unfinished shards; the manifest when this process finished the last one, else None."""
    args, ranks = job.args, job.ranks
    todo = pending_units(args.out, job.units, ranks)
    mine = len(job.units[ranks.rank :: ranks.world_size])
    bar = Progress(todo, enabled=ranks.rank == 0 and not args.no_progress)
    t0 = time.perf_counter()
    written = encode_units(job.model.to(ranks.device).eval(), todo, job.plan, job.opts, ranks, bar) if todo else 0
    bar.bar.close()
    seconds = time.perf_counter() - t0
    print(f"rank {ranks.rank}: {written} latents in {seconds:.1f} s ({written / max(seconds, 1e-9):.1f} img/s); "
          f"{mine - len(todo)} of {mine} shards were already done")  # fmt: skip
    manifest = finalize(args.out, job.units, job.header)
    if manifest is not None:
        print(summary_line(manifest, args.out))
    return manifest


def summary_line(manifest: dict, out: Path) -> str:
    stats = manifest["statistics"]
    line = f"wrote {manifest['samples']} latents in {len(manifest['shards'])} shards to {out} "
    line += f"(skipped {manifest['skipped_count']}: {manifest['skipped_by_reason']})"
    if stats:
        line += f"; latent RMS {stats['rms']:.4f} -> scaling_factor 1/RMS = {stats['scaling_factor']:.5f} "
        line += f"(the model has {manifest['model']['scaling_factor']:.5f})"
    return line


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = setup(args)
    except ValueError as err:  # ConfigError, WeightsError: bad input, named with its fix
        print(f"error: {err}", file=sys.stderr)
        return 2
    manifest = run(job)
    if manifest is not None and manifest["samples"] == 0:  # a scheduler must not record an empty data set as done
        print(f"error: {nothing_encoded(manifest, args.out)}", file=sys.stderr)
        return 2
    return 0


FIXES = {"too_small": "--small-images upsample or a lower --resolution",
         "undecodable": "check the files (the manifest names each one)"}  # fmt: skip


def nothing_encoded(manifest: dict, out: Path) -> str:
    """Every image was skipped: the counts by reason and what to change."""
    reasons = manifest["skipped_by_reason"]
    fixes = "; ".join(f"{r}: {FIXES[r]}" for r in reasons if r in FIXES) or "check the data"
    return (f"no latent written: {manifest['read']} image(s) read, all skipped {reasons} "
            f"(each named in {out / MANIFEST}). Fix: {fixes}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
