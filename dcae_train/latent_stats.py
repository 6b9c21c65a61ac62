"""`python -m dcae_train.latent_stats`: latent statistics over a dataset and the recommended scaling factor.

    python -m dcae_train.latent_stats --model runs/x/checkpoints/final.ckpt --data /data/val --resolution 512 \
        --num-images 5000 --out latent_stats.json --write-config exported/dc-ae-mine-diffusers

Reports per-channel mean/std, overall mean/std/RMS, and `scaling_factor = 1 / RMS` in the diffusers convention:
the diffusion model sees `encode(x) * scaling_factor` (multiply on encode, divide on decode; no shift).
Never carry a factor across conventions: Open-Sora's DC-AE divides by std instead (docs/architecture.md,
"Latent scaling").
`--write-config` sets `scaling_factor` in an exported diffusers model's `config.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dcae_train.data.shards import check_output_file, write_atomic
from dcae_train.evaluate import (
    DTYPES,
    add_model_args,
    channel_list,
    check_prefixes,
    check_resolution,
    check_sizes_and_count,
    load_eval_model,
    setup_ranks,
)
from dcae_train.evaluation.data import eval_loader, resolve_data
from dcae_train.evaluation.evaluator import note_skipped
from dcae_train.evaluation.latents import LatentAccumulator


@torch.no_grad()
def compute_latent_stats(
    model: nn.Module,
    batches: Iterable[dict],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_images: int | None = None,
    progress: Any = None,
    prefixes: Sequence[int] = (),
) -> dict[str, Any]:
    """Encode every batch and summarise the (unscaled) latents; merges ranks under torch.distributed.
    `prefixes` (DC-AE 1.5): also the scaling factor of each channel prefix, from the same statistics (a prefix
    latent is the first channels of the full one)."""
    was_training = model.training
    model.eval()
    acc, seen = None, 0
    skipped = 0
    for batch in batches:
        skipped += len(note_skipped(batch))
        x = batch["image"] if max_images is None else batch["image"][: max_images - seen]
        if x.shape[0] == 0:  # every image of this batch was unreadable
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            z = model.encode(x.to(device))  # (B, c, H/f, W/f)
        acc = acc or LatentAccumulator(z.shape[1])
        acc.update(z.float())
        seen += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
        if max_images is not None and seen >= max_images:
            break
    model.train(was_training)
    if acc is None:
        raise ValueError("no images were encoded: the dataset is empty or --num-images is 0")
    acc.all_reduce()
    stats = {**acc.summary(), "num_images_this_rank": seen, "skipped_images_this_rank": skipped}
    if prefixes:
        stats["prefix_scaling_factors"] = {str(c): f for c, f in acc.prefix_scaling_factors(list(prefixes)).items()}
    return stats


def write_channel_scaling(path: Path, per_channel_rms: Sequence[float]) -> Path:
    """A (C,) float32 .npy of 1 / RMS per channel: multiply latent channel c by entry c (the per-channel form of
    the scaling factor; a diffusion model on a c-channel prefix uses the first c entries)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, (1.0 / np.asarray(per_channel_rms, dtype=np.float64)).astype(np.float32))
    tmp.replace(path)  # atomic: never a half-written file under the final name
    return path


def write_scaling_factor(target: Path, scaling_factor: float) -> Path:
    """Set `scaling_factor` in a diffusers `config.json` (a model folder or the file itself)."""
    config = target / "config.json" if target.is_dir() else target
    if not config.is_file():
        raise ValueError(f"--write-config={target}: no config.json there; export the model first (export_diffusers)")
    data = json.loads(config.read_text())
    if data.get("_class_name") not in (None, "AutoencoderDC"):
        raise ValueError(f"{config} is a {data.get('_class_name')} config, not AutoencoderDC")
    data["scaling_factor"] = scaling_factor
    # atomic, through a symlink (a Hub cache snapshot links its files): the link stays, its target is replaced
    write_atomic(config.resolve(), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return config


def check_write_config(target: Path) -> None:
    """Only a diffusers `config.json` holds a scaling factor that loading reads; an original-layout export
    (`model.safetensors`, whose metadata carries the config) cannot take one: refuse it before any work."""
    folder = target if target.is_dir() else target.parent
    config = folder / "config.json"
    if (folder / "model.safetensors").is_file() and (
        not config.is_file() or json.loads(config.read_text()).get("_class_name") != "AutoencoderDC"
    ):
        raise ValueError(
            f"--write-config={target}: an original-layout export (model.safetensors) keeps its scaling factor in the "
            f"file's metadata, which --write-config does not rewrite. Give a diffusers export folder (python -m "
            f"dcae_train.export SOURCE OUT), or re-export this one with --scaling-factor F, or use --scaling-file"
        )
    if not (target / "config.json").is_file() and not target.is_file():
        raise ValueError(f"--write-config={target}: no config.json there; export the model first")
    check_output_file(config.resolve(), "--write-config")  # rewritten atomically, beside it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcae_train.latent_stats", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder, folder of .tar shards, or a shard pattern")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-images", type=int, default=None, help="the first N images (0 or omitted: all)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", type=Path, default=Path("latent_stats.json"))
    p.add_argument("--write-config", type=Path, default=None, help="diffusers model dir whose scaling_factor to set")
    p.add_argument("--latent-channels", type=channel_list, default=[], help="DC-AE 1.5: prefixes, e.g. 16,32,64,128")
    p.add_argument("--scaling-file", type=Path, default=None, help="write 1/RMS per latent channel as a .npy array")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    check_sizes_and_count(args)
    if args.write_config is not None:  # checked before any encoding
        check_write_config(args.write_config)
    if args.out.is_dir() or args.out.parent.is_file():
        raise ValueError(f"--out={args.out}: give a .json file path in a folder, e.g. --out latent_stats.json")
    if args.scaling_file is not None and args.scaling_file.suffix != ".npy":
        raise ValueError(f"--scaling-file={args.scaling_file}: give a .npy path, e.g. latent_scaling.npy")
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success; 2, with one line naming the problem and its fix, on bad input."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """`main` without the exit code: the statistics, or an exception on bad input."""
    args = parse_args(argv)
    ranks = setup_ranks(args.device)
    data = resolve_data(args.data)
    for path, flag in ((args.out, "--out"), (args.scaling_file, "--scaling-file")):
        if path is not None:  # before the work: a wrong path costs seconds
            check_output_file(path, flag)
    model = load_eval_model(args.model, not args.raw, args.random_init, args.seed).to(ranks.device)
    check_resolution(model, args.resolution)
    check_prefixes(model, args.latent_channels)
    loader = eval_loader(data, args.resolution, args.batch_size, args.num_workers, args.num_images, ranks.rank,
                         ranks.world_size)  # fmt: skip
    quota = -(-args.num_images // ranks.world_size) if args.num_images else None
    progress = None
    if not args.no_progress and ranks.rank == 0:
        progress = tqdm(total=quota, unit="img", desc="latent stats", file=sys.stderr)
    t0 = time.perf_counter()
    stats = compute_latent_stats(model, loader, ranks.device, DTYPES[args.dtype], quota, progress, args.latent_channels)
    stats.update(model=args.model, data=args.data, resolution=args.resolution, seconds=time.perf_counter() - t0)
    stats["model_scaling_factor"] = float(model.scaling_factor)
    if ranks.rank == 0:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, (json.dumps(stats, indent=2) + "\n").encode())
        print(f"latent mean {stats['mean']:.4f}  std {stats['std']:.4f}  RMS {stats['rms']:.4f}  ->  "
              f"scaling_factor = 1/RMS = {stats['scaling_factor']:.5f} (multiply on encode; model has "
              f"{stats['model_scaling_factor']:.5f}); wrote {args.out}")  # fmt: skip
        if args.write_config is not None:
            print(f"set scaling_factor in {write_scaling_factor(args.write_config, stats['scaling_factor'])}")
        for c, f in stats.get("prefix_scaling_factors", {}).items():
            print(f"  first {c} channels: scaling_factor = {f:.5f}")
        if args.scaling_file is not None:
            print(f"wrote 1/RMS per channel to {write_channel_scaling(args.scaling_file, stats['per_channel_rms'])}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return stats


if __name__ == "__main__":
    sys.exit(main())
