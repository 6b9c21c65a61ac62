"""Evaluation throughput: our evaluator vs torchmetrics' metrics on the same reconstructions, same run.

    python scripts/bench_eval.py --case sana      # 64 images at 256 px, dc-ae-f32c32-sana-1.1 (random weights)
    python scripts/bench_eval.py --case tiny-demo # 1,000 demo images at 256 px, the tiny variant

Every batch is decoded and reconstructed once; then our metrics (PSNR, SSIM, LPIPS-alex, FID Inception
features) and torchmetrics' (PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure, LPIPS, FID) run on it in
alternating order, so machine load hits both equally. Metric networks have random weights (offline): the
timing is that of the real architectures. Reported: medians over batches, ms per image, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torchvision

from dcae_train.data.demo import demo_shards
from dcae_train.evaluation.data import EvalData, eval_loader, resolve_data
from dcae_train.evaluation.evaluator import ReconstructionEvaluator
from dcae_train.evaluation.extractors import ALEXNET, InceptionFeatures, LPIPSMetric
from dcae_train.evaluation.metrics import to_uint8
from dcae_train.models import build_model

CASES = {
    "sana": {"variant": "dc-ae-f32c32-sana-1.1", "images": 64, "batch": 8},
    "tiny-demo": {"variant": "tiny", "images": 1000, "batch": 25},
}


def random_metric_weights(home: Path) -> Path:
    """Random AlexNet (LPIPS trunk, under its official name) and Inception files: same cost, no download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), ckpt / ALEXNET.names[0])
    empty = ckpt / "empty.pth"
    torch.save({}, empty)
    load = FeatureExtractorInceptionV3.load_state_dict
    FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None  # keep the random init
    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    finally:
        FeatureExtractorInceptionV3.load_state_dict = load
    path = ckpt / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


class TorchmetricsBaseline:
    def __init__(self, inception: Path, device: torch.device) -> None:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.psnr = PeakSignalNoiseRatio(data_range=255.0, dim=(1, 2, 3)).to(device)
        self.ssim = StructuralSimilarityIndexMeasure(data_range=(0.0, 255.0)).to(device)
        self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)
        self.fid = FrechetInceptionDistance(feature_extractor_weights_path=str(inception)).to(device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor) -> None:
        u, v = to_uint8(x), to_uint8(x_hat)
        self.psnr.update(v.float(), u.float())
        self.ssim.update(v.float(), u.float())
        self.lpips.update(v.float() / 255, u.float() / 255)
        self.fid.update(u, real=True)
        self.fid.update(v, real=False)

    def compute(self) -> dict[str, float]:
        return {k: float(getattr(self, k).compute()) for k in ("psnr", "ssim", "lpips", "fid")}


def data_for(case: str, images: int, cache: Path) -> EvalData:
    specs = demo_shards(cache)
    train, val = resolve_data(specs["train"]), resolve_data(specs["val"])
    files = (train.files + val.files) * (1 + images // (specs["num_train"] + specs["num_val"]))
    return EvalData("shards", files, specs["dir"])  # the demo set, repeated to reach `images`


@torch.no_grad()
def reconstruct(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = model.encode(x)  # (B, 32, 8, 8) for f32 at 256 px
    return z, model.decode(z)


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t


def run(case: str, device: torch.device, workers: int, baseline_every: int = 1) -> None:
    cfg = CASES[case]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TORCH_HOME"] = tmp
        inception = random_metric_weights(Path(tmp))
        torch.manual_seed(0)
        model = build_model(cfg["variant"]).to(device).eval()
        ours = ReconstructionEvaluator(
            LPIPSMetric("alex", verify=False).to(device), InceptionFeatures(inception, verify=False).to(device)
        )
        base = TorchmetricsBaseline(inception, device)
        data = data_for(
            case, cfg["images"], Path(os.environ.get("DCAE_TRAIN_CACHE", Path.home() / ".cache/dcae_train"))
        )
        loader = eval_loader(data, 256, cfg["batch"], num_workers=workers)
        t_data, t_model, t_ours, t_base, n = [], [], [], [], 0  # (seconds, images) per batch
        t_load = time.perf_counter()
        for i, batch in enumerate(loader):
            x = batch["image"][: cfg["images"] - n].to(device)
            b = x.shape[0]
            t_data.append((time.perf_counter() - t_load, b))
            (z, x_hat), dt = timed(partial(reconstruct, model, x), device)
            t_model.append((dt, b))
            steps = [(t_ours, partial(ours.update, x, x_hat, z))]
            if i % baseline_every == 0:  # the baseline on every k-th batch only (long CPU runs)
                steps.append((t_base, partial(base.update, x, x_hat)))
            for times, fn in steps if i % 2 == 0 else steps[::-1]:  # alternate who goes first
                times.append((timed(fn, device)[1], b))
            n += b
            t_load = time.perf_counter()
            if n >= cfg["images"]:
                break
        res_ours, c_ours = timed(ours.compute, device)
        res_base, c_base = timed(base.compute, device)
    report(case, device, cfg, n, t_data, t_model, t_ours, t_base, c_ours, c_base, res_ours, res_base)


def report(case, device, cfg, n, t_data, t_model, t_ours, t_base, c_ours, c_base, res_ours, res_base) -> None:
    med = lambda v: statistics.median(t / b for t, b in v) * 1e3  # noqa: E731  ms per image, median over batches
    total_ours = sum(t for t, _ in t_data + t_model + t_ours)
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n### {case}: {cfg['variant']}, {n} images at 256 px, batch {cfg['batch']}, {dev}\n")
    print("| stage (median ms / image over batches) | ours | torchmetrics | ours / torchmetrics |")
    print("|---|---|---|---|")
    print(f"| data (decode + ADM crop), waited | {med(t_data):.1f} | (shared) | |")
    print(f"| model encode + decode | {med(t_model):.1f} | (shared) | |")
    print(f"| metrics: PSNR+SSIM+LPIPS+FID features | {med(t_ours):.1f} | {med(t_base):.1f} | "
          f"{med(t_ours) / med(t_base):.2f} |")  # fmt: skip
    print(f"\n(batches timed: ours {len(t_ours)}, torchmetrics {len(t_base)})")
    print(f"| final compute (FID sqrtm), ms total | {c_ours * 1e3:.0f} | {c_base * 1e3:.0f} | {c_ours / c_base:.2f} |")
    print(f"\nEnd-to-end evaluation throughput (data + model + our metrics, summed): {n / total_ours:.2f} images/s "
          f"({total_ours:.1f} s for {n} images).")  # fmt: skip
    diffs = {k: abs(res_ours[k] - res_base[k]) for k in ("psnr", "ssim", "lpips")}
    print(f"Agreement with torchmetrics: |dPSNR| {diffs['psnr']:.2e}, |dSSIM| {diffs['ssim']:.2e}, "
          f"|dLPIPS| {diffs['lpips']:.2e}; rFID ours {res_ours['rfid']:.3f} vs torchmetrics {res_base['fid']:.3f} "
          "(Inception preprocessing differs on purpose: pytorch-fid resize, as the DC-AE protocol).")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", choices=[*CASES, "all"], default="all")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--images", type=int, default=None, help="override the case's image count (smoke runs)")
    p.add_argument("--baseline-every", type=int, default=1, help="run torchmetrics on every k-th batch only")
    args = p.parse_args()
    for case in CASES if args.case == "all" else [args.case]:
        if args.images:
            CASES[case]["images"] = args.images
        run(case, torch.device(args.device), args.workers, args.baseline_every)


if __name__ == "__main__":
    main()
