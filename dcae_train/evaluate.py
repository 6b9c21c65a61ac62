"""`python -m dcae_train.evaluate`: reconstruction metrics with the official DC-AE protocol.

    python -m dcae_train.evaluate --model runs/x/checkpoints/final.ckpt --data /data/imagenet/val \
        --resolution 512 --batch-size 32 --out eval/
    torchrun --nproc-per-node 8 -m dcae_train.evaluate --model mit-han-lab/dc-ae-f64c128-in-1.0-diffusers ...

Writes `<out>/eval.json` (all numbers), `<out>/eval.md` (a table beside the published rows) and
`<out>/worst.png` (the lowest-PSNR reconstructions). Offline: LPIPS (AlexNet) and Inception weights are read
from `$TORCH_HOME/hub/checkpoints/` or the paths given; every missing file is reported before the model loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dcae_train.data.shards import check_output_folder, write_atomic
from dcae_train.evaluation.data import EvalData, eval_loader, resolve_data
from dcae_train.evaluation.evaluator import ReconstructionEvaluator, compute_all, evaluate_model
from dcae_train.evaluation.extractors import build_feature_extractor, extractor_id
from dcae_train.evaluation.reference import load_reference, reference_path
from dcae_train.evaluation.reports import markdown_table, prefix_table, save_prefix_plot, save_worst_grid, write_json
from dcae_train.losses.perceptual import LPIPS
from dcae_train.models import DCAE, VARIANTS, build_model
from dcae_train.weights import load_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Arguments ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcae_train.evaluate", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--data", required=True, help="image folder, folder of .tar shards, or a shard pattern")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-images", type=int, default=None, help="evaluate the first N images (0 or omitted: all)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model precision (protocol: fp32)")
    p.add_argument("--lpips", choices=["alex", "vgg", "random", "off"], default="alex", help="random: tests only")
    p.add_argument("--lpips-weights", default=None, help="torchvision trunk file (default: $TORCH_HOME)")
    p.add_argument("--fid", choices=["inception", "tiny", "off"], default="inception", help="tiny: tests only")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth path")
    p.add_argument("--fid-method", choices=["eigh", "sqrtm"], default="eigh", help="sqrtm: scipy, as pytorch-fid")
    p.add_argument("--no-verify-weights", action="store_true", help="skip the SHA-256 check of metric weights")
    p.add_argument(
        "--stats-cache",
        type=Path,
        default=None,
        help="reference-statistics folder (default $DCAE_TRAIN_CACHE/fid_stats)",
    )
    p.add_argument(
        "--latent-channels",
        type=channel_list,
        default=[],
        help="DC-AE 1.5: also evaluate these latent prefixes, e.g. 16,32,64,128 (a table in eval.md, prefixes.png)",
    )
    p.add_argument("--worst", type=int, default=8, help="images in worst.png")
    p.add_argument("--out", type=Path, default=Path("eval"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def check_sizes_and_count(args: argparse.Namespace) -> None:
    """--resolution, --batch-size and --num-images, shared by evaluate and latent_stats; --num-images 0 -> None."""
    if args.resolution <= 0 or args.batch_size <= 0:
        raise ValueError(f"--resolution={args.resolution} and --batch-size={args.batch_size}: give positive sizes, "
                         f"e.g. --resolution 256 --batch-size 16")  # fmt: skip
    if args.num_images is not None and args.num_images < 0:
        raise ValueError(f"--num-images={args.num_images}: give a count >= 1, or 0 for all images")
    args.num_images = args.num_images or None  # 0 = all, as omitting it


def _check_args(args: argparse.Namespace) -> None:
    check_sizes_and_count(args)
    if args.num_images is not None and args.num_images < 2 and args.fid != "off":
        raise ValueError(f"--num-images={args.num_images}: FID needs at least 2 images (or pass --fid off)")


def channel_list(text: str) -> list[int]:
    """`16,32,64` -> [16, 32, 64] (ascending, positive)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated channel counts, e.g. 16,32,64,128") from None
    if not values or values != sorted(set(values)) or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give ascending channel counts >= 1, e.g. 16,32,64,128")
    return values


def check_prefixes(model: DCAE, prefixes: list[int], flag: str = "--latent-channels") -> None:
    """Prefixes need a variant without a shortcut around the latent and must fit its latent."""
    if not prefixes:
        return
    if not model.config.takes_latent_prefixes:
        raise ValueError(f"{flag}: this model has a shortcut around the latent and takes no prefixes (DC-AE 1.5 does)")
    if prefixes[-1] > model.latent_channels:
        raise ValueError(f"{flag}={prefixes}: the model has {model.latent_channels} latent channels")


# Distributed --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: torch.device


def setup_ranks(device_arg: str) -> Ranks:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Ranks(torch.distributed.get_rank(), world, device)
    return Ranks(0, 1, device)


# Model --------------------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --raw, --random-init, --seed: what every tool that reads a model takes (see `load_eval_model`)."""
    p.add_argument("--model", required=True, help="our .ckpt, diffusers dir, original .safetensors, HF id or variant")
    p.add_argument("--raw", action="store_true", help="our checkpoints: the raw weights, not the EMA copy")
    p.add_argument("--random-init", action="store_true", help="--model is a variant name: random weights (benchmarks)")
    p.add_argument("--seed", type=int, default=0, help="seed of --random-init weights")


def load_eval_model(source: str, ema: bool, random_init: bool, seed: int = 0) -> DCAE:
    if random_init:
        if source not in VARIANTS:
            raise ValueError(f"--random-init needs a variant name for --model, got {source!r}; one of {VARIANTS}")
        torch.manual_seed(seed)  # same random weights on every rank and every run
        return build_model(source)
    return load_model(source, ema=ema)


# Main ---------------------------------------------------------------------------------------------------
def build_metrics(args: argparse.Namespace) -> tuple[nn.Module | None, nn.Module | None]:
    """The metric networks first: a missing weight file must fail before the model or data are touched."""
    verify = not args.no_verify_weights
    lpips = None
    if args.lpips != "off":
        net = "alex" if args.lpips == "random" else args.lpips
        lpips = LPIPS(net, pretrained=args.lpips != "random", path=args.lpips_weights, verify=verify)
    features = None
    if args.fid != "off":
        features = build_feature_extractor(args.fid, args.inception_weights, verify=verify)
    return lpips, features


def run(args: argparse.Namespace) -> dict[str, Any]:
    ranks = setup_ranks(args.device)
    data = resolve_data(args.data)
    check_output_folder(args.out)  # before the work: a wrong --out costs seconds, not an evaluation
    lpips, features = build_metrics(args)
    model = load_eval_model(args.model, not args.raw, args.random_init, args.seed).to(ranks.device)
    check_resolution(model, args.resolution)
    check_prefixes(model, args.latent_channels)

    ref_path, reference = None, None
    if features is not None:
        ref_path = reference_path(data, args.resolution, extractor_id(features), args.num_images, args.stats_cache)
        reference = load_reference(ref_path)
    lpips = lpips.to(ranks.device) if lpips is not None else None
    features = features.to(ranks.device) if features is not None else None
    evaluators = {
        p: ReconstructionEvaluator(
            lpips,
            features,
            reference,
            worst_k=args.worst if p is None else 0,
            fid_method=args.fid_method,
            real_features=p is None,
        )  # fmt: skip
        for p in [None, *args.latent_channels]
    }
    loader = eval_loader(data, args.resolution, args.batch_size, args.num_workers, args.num_images, **_rank_kw(ranks))
    quota = -(-args.num_images // ranks.world_size) if args.num_images else None
    progress = _progress(args, ranks, data, quota)
    timing = evaluate_model(model, loader, evaluators, ranks.device, DTYPES[args.dtype], quota, progress)
    metrics = compute_all(evaluators)
    full = evaluators[None]
    if ranks.rank == 0 and features is not None and reference is None and full.real is not None:
        full.real.save(ref_path, {"data": args.data, "resolution": args.resolution})
    result = _result(args, ranks, model, metrics, timing, features, ref_path, reference is not None)
    if ranks.rank == 0:
        write_reports(result, full.worst(), args.out)
    return result


def _rank_kw(ranks: Ranks) -> dict[str, int]:
    return {"rank": ranks.rank, "world_size": ranks.world_size}


def check_resolution(model: DCAE, resolution: int) -> None:
    f = model.spatial_compression_ratio
    if resolution % f:
        raise ValueError(f"--resolution={resolution} must be a multiple of the model's spatial compression {f}")


def _progress(args: argparse.Namespace, ranks: Ranks, data: EvalData, quota: int | None):
    if args.no_progress or ranks.rank != 0:
        return None
    total = quota if quota is not None else (len(data.files) // ranks.world_size if data.kind == "folder" else None)
    return tqdm(total=total, unit="img", desc="evaluate", file=sys.stderr)


def _result(args, ranks, model, per_prefix, timing, features, ref_path, cached) -> dict[str, Any]:
    metrics = dict(per_prefix[None])
    latent = metrics.pop("latent", None)
    prefixes = [{"latent_channels": p, **m} for p, m in per_prefix.items() if p is not None]
    device = str(ranks.device) if ranks.device.type == "cpu" else torch.cuda.get_device_name(ranks.device)
    return {
        "model": args.model,
        "weights": "random" if args.random_init else ("raw" if args.raw else "ema (when present)"),
        "data": args.data,
        "resolution": args.resolution,
        "metrics": metrics,
        "skipped_images": timing["skipped"],  # unreadable images (corrupt, bombs) skipped on this rank, warned
        "latent": latent,
        "prefixes": prefixes,  # DC-AE 1.5: the metrics and latent statistics of each --latent-channels prefix
        "model_scaling_factor": float(model.scaling_factor),
        "fid_features": extractor_id(features) if features is not None else None,
        "reference_stats": {"path": str(ref_path), "cached": cached} if ref_path else None,
        "throughput": {
            "images_per_s": timing["images_per_s"] * ranks.world_size,
            "seconds": timing["seconds"],
            "batch_size": args.batch_size,
            "world_size": ranks.world_size,
            "dtype": args.dtype,
        },
        "device": f"{ranks.world_size} x {device}" if ranks.world_size > 1 else device,
        "protocol": "ADM centre crop; uint8 quantisation; PSNR per image; SSIM range 255; LPIPS "
        f"{args.lpips}; FID {args.fid} pool features, trace sqrt by {args.fid_method}",
    }


def write_reports(result: dict[str, Any], worst: list[dict], out: Path) -> None:
    result["worst"] = [{"key": w["key"], "psnr": w["psnr"]} for w in worst]
    write_json(result, out / "eval.json")
    write_atomic(out / "eval.md", (markdown_table(result) + prefix_table(result)).encode())
    save_worst_grid(worst, out / "worst.png")
    if result["prefixes"]:
        save_prefix_plot(result, out / "prefixes.png")


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success; 2, with one line naming the problem and its fix, on bad input."""
    try:
        args = parse_args(argv)
        result = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown_table(result, with_published=False) + prefix_table(result))
        print(f"wrote {args.out / 'eval.json'}, {args.out / 'eval.md'}, {args.out / 'worst.png'}")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
