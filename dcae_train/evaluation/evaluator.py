"""Reconstruction evaluation: accumulate PSNR / SSIM / LPIPS / FID features / latent statistics over batches.

`ReconstructionEvaluator` is the library piece shared by the `evaluate` CLI and the training callback:
feed it (x, x_hat, z) batches in [-1, 1]; `compute()` returns plain floats. Everything is quantised to uint8
before any metric (official protocol). Under torch.distributed, `compute()` merges all ranks first.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.evaluation.metrics import FeatureStats, check_images, fid_from_stats, psnr_per_image, ssim_per_image
from dcae_train.evaluation.metrics import to_uint8 as quantise
from dcae_train.losses.perceptual import LPIPS
from dcae_train.models import DCAE

log = logging.getLogger(__name__)


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(order=True)
class _Worst:
    neg_psnr: float  # heap on -PSNR keeps the k lowest PSNRs
    key: str
    x: torch.Tensor = field(compare=False)  # (3, H, W) uint8, CPU
    x_hat: torch.Tensor = field(compare=False)


class ReconstructionEvaluator:
    """Metric state for one model on one dataset.

    lpips: an `LPIPS` (or None to skip). features: an FID feature extractor (uint8 in, (B, d) out) or None.
    reference: cached real-image feature statistics; when None they are accumulated from the batches, unless
    `real_features=False` (evaluators of latent prefixes: the full latent's evaluator gathers them once, and
    `compute(reference=...)` receives them).
    """

    def __init__(
        self,
        lpips: LPIPS | None = None,
        features: nn.Module | None = None,
        reference: FeatureStats | None = None,
        worst_k: int = 8,
        fid_method: str = "eigh",
        real_features: bool = True,
    ) -> None:
        self.lpips, self.features, self.worst_k, self.fid_method = lpips, features, worst_k, fid_method
        self.reference, self.real_features = reference, real_features
        self.real: FeatureStats | None = None
        self.fake: FeatureStats | None = None
        self.latents: LatentAccumulator | None = None
        self.psnr: list[float] = []
        self.ssim: list[float] = []
        self.lpips_values: list[float] = []
        self._worst: list[_Worst] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor | None = None, keys=None) -> None:
        check_images(x, "x")
        if x_hat.shape != x.shape:
            raise ValueError(f"reconstruction {tuple(x_hat.shape)} differs from the input {tuple(x.shape)}")
        x_u8, x_hat_u8 = quantise(x), quantise(x_hat)  # (B, 3, H, W) uint8: the official order
        psnr = psnr_per_image(x_u8, x_hat_u8)
        self.psnr += psnr.tolist()
        self.ssim += ssim_per_image(x_u8, x_hat_u8).tolist()
        if self.lpips is not None:  # on the quantised images, mapped back to [-1, 1]
            self.lpips_values += self.lpips.distance(x_hat_u8.float() / 127.5 - 1, x_u8.float() / 127.5 - 1).tolist()
        if self.features is not None:
            self._update_features(x_u8, x_hat_u8)
        if z is not None:
            if self.latents is None:
                self.latents = LatentAccumulator(z.shape[1])
            self.latents.update(z)
        self._track_worst(psnr, x_u8, x_hat_u8, keys)

    def _update_features(self, x_u8: torch.Tensor, x_hat_u8: torch.Tensor) -> None:
        fake = self.features(x_hat_u8)  # (B, d)
        if self.fake is None:
            self.fake = FeatureStats(fake.shape[1])
        self.fake.update(fake)
        if self.reference is None and self.real_features:
            real = self.features(x_u8)
            if self.real is None:
                self.real = FeatureStats(real.shape[1])
            self.real.update(real)

    def _track_worst(self, psnr: torch.Tensor, x_u8, x_hat_u8, keys) -> None:
        if self.worst_k <= 0:
            return
        keys = list(keys) if keys is not None else [str(len(self.psnr) - len(psnr) + i) for i in range(len(psnr))]
        for i, p in enumerate(psnr.tolist()):
            item = _Worst(-p, str(keys[i]), x_u8[i].cpu(), x_hat_u8[i].cpu())
            if len(self._worst) < self.worst_k:
                heapq.heappush(self._worst, item)
            elif item > self._worst[0]:  # lower PSNR than the best of the kept worst
                heapq.heapreplace(self._worst, item)

    # Results --------------------------------------------------------------------------------------------
    def worst(self) -> list[dict[str, Any]]:
        """The k lowest-PSNR images, worst first: {"key", "psnr", "x", "x_hat"} (uint8 CHW)."""
        items = sorted(self._worst, reverse=True)
        return [{"key": w.key, "psnr": -w.neg_psnr, "x": w.x, "x_hat": w.x_hat} for w in items]

    def _gather(self) -> None:
        """Merge every rank's state into each rank (small lists via all_gather_object, sums via all_reduce)."""
        if not _dist():
            return
        world = torch.distributed.get_world_size()
        parts: list[Any] = [None] * world
        real, fake = (s.cpu() if s is not None else None for s in (self.real, self.fake))
        mine = (self.psnr, self.ssim, self.lpips_values, self._worst, real, fake)
        torch.distributed.all_gather_object(parts, mine)
        self.psnr = [v for p in parts for v in p[0]]
        self.ssim = [v for p in parts for v in p[1]]
        self.lpips_values = [v for p in parts for v in p[2]]
        self._worst = heapq.nlargest(self.worst_k, [w for p in parts for w in p[3]])
        heapq.heapify(self._worst)
        self.real = _merge([p[4] for p in parts])
        self.fake = _merge([p[5] for p in parts])
        if self.latents is not None:
            self.latents.all_reduce()

    def compute(self, gather: bool = True, reference: FeatureStats | None = None) -> dict[str, Any]:
        """Final metrics. gather=False: this rank's images only (callers that run on one rank of many);
        `reference`: the real-image statistics to use when this evaluator does not gather its own."""
        if gather:
            self._gather()
        n = len(self.psnr)
        if n == 0:
            raise ValueError("no images were evaluated: the dataset is empty or num_images is 0")
        out: dict[str, Any] = {
            "num_images": n,
            "psnr": sum(self.psnr) / n,
            "ssim": sum(self.ssim) / n,
            "lpips": sum(self.lpips_values) / n if self.lpips_values else None,
            "rfid": None,
        }
        if self.fake is not None:
            real = next(s for s in (self.reference, self.real, reference) if s is not None)
            out["rfid"] = fid_from_stats(real, self.fake, self.fid_method)
        if self.latents is not None:
            out["latent"] = self.latents.summary()
        return out


def _merge(stats: list[FeatureStats | None]) -> FeatureStats | None:
    present = [s for s in stats if s is not None]
    if not present:
        return None
    total = FeatureStats(present[0].dim)
    for s in present:
        total.merge(s)
    return total


# The loop -----------------------------------------------------------------------------------------------
def prefix_latents(model: DCAE, x: torch.Tensor, prefixes: Sequence[int | None]) -> list[torch.Tensor]:
    """The latent of each entry of `prefixes` (None: all channels), from one pass through the encoder body."""
    if all(p is None for p in prefixes):
        z = model.encode(x)
        return [z for _ in prefixes]
    return model.encode(x, latent_channels=[model.latent_channels if p is None else p for p in prefixes])


def compute_all(evaluators: Mapping[int | None, ReconstructionEvaluator], **kw) -> dict[int | None, dict[str, Any]]:
    """Metrics of every evaluator; the prefixes' rFID uses the real statistics the full latent's gathered."""
    out = {None: evaluators[None].compute(**kw)}
    real = evaluators[None].reference or evaluators[None].real
    out.update({p: ev.compute(reference=real, **kw) for p, ev in evaluators.items() if p is not None})
    return out


@torch.no_grad()
def evaluate_model(
    model: DCAE,
    batches: Iterable[dict],
    evaluators: Mapping[int | None, ReconstructionEvaluator],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_images: int | None = None,
    progress: Any = None,
) -> dict[str, float]:
    """Run encode -> decode over `batches` (at most `max_images` on this rank) into each evaluator: key None is
    the full latent, an int a latent prefix (DC-AE 1.5); returns timing facts."""
    prefixes = list(evaluators)
    was_training = model.training
    model.eval()
    seen, t0, skipped = 0, time.perf_counter(), []
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for batch in batches:
        skipped += note_skipped(batch)
        x = batch["image"]
        if x.shape[0] == 0:  # every image of this batch was unreadable
            continue
        keys = batch.get("__key__")
        if max_images is not None:
            x, keys = x[: max_images - seen], (keys[: max_images - seen] if keys is not None else None)
        x = x.to(device, non_blocking=True)
        with autocast:
            zs = prefix_latents(model, x, prefixes)  # [(B, c, H/f, W/f)], unscaled
            x_hats = [model.decode(z) for z in zs]  # [(B, 3, H, W)]
        for p, z, x_hat in zip(prefixes, zs, x_hats, strict=True):
            evaluators[p].update(x.float(), x_hat.float(), z.float(), keys)
        seen += x.shape[0]
        if progress is not None:
            progress.update(x.shape[0])
        if max_images is not None and seen >= max_images:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.train(was_training)
    seconds = time.perf_counter() - t0
    if skipped:
        log.warning("skipped %d unreadable image(s) in total", len(skipped))
    return {"seconds": seconds, "images": seen, "images_per_s": seen / max(seconds, 1e-9), "skipped": len(skipped)}


def note_skipped(batch: dict) -> list[str]:
    """The batch's unreadable images (corrupt, bombs, no image member), each warned about once."""
    bad = list(batch.get("skipped", []))
    for what in bad:
        log.warning("skipped an unreadable image: %s", what)
    return bad
