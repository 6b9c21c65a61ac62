"""Running latent statistics: per-channel mean/std, overall mean/std/RMS, and the diffusers scaling factor.

diffusers convention (docs/architecture.md, "Latent scaling"): the diffusion model sees z * scaling_factor, with
scaling_factor = 1 / RMS(z) and no shift. float64 sums, so batches and ranks merge exactly; `state()` and
`from_state()` carry the sums through JSON unchanged (a Python float prints as the shortest string that reads back as
the same double), so partial results written to disk merge exactly too (`encode_dataset` keeps one per shard).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class LatentAccumulator:
    channels: int
    count: int = 0  # values per channel seen so far (B * H * W summed over batches)
    total: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (C,) sum of z
    total_sq: torch.Tensor = field(default=None)  # type: ignore[assignment]  # (C,) sum of z^2

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = torch.zeros(self.channels, dtype=torch.float64)
        if self.total_sq is None:
            self.total_sq = torch.zeros(self.channels, dtype=torch.float64)

    def update(self, z: torch.Tensor) -> None:
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"latent has shape {tuple(z.shape)}: expected (B, {self.channels}, h, w)")
        zd = z.detach().double()
        self.count += zd.shape[0] * zd.shape[2] * zd.shape[3]
        self.total += zd.sum(dim=(0, 2, 3)).cpu()
        self.total_sq += zd.pow(2).sum(dim=(0, 2, 3)).cpu()

    def all_reduce(self) -> None:
        """Sum over ranks (no-op without torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
        packed = torch.cat([self.total, self.total_sq, torch.tensor([float(self.count)], dtype=torch.float64)])
        packed = packed.to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        c = self.channels
        self.total, self.total_sq, self.count = packed[:c], packed[c : 2 * c], int(packed[-1].item())

    def per_channel_rms(self) -> torch.Tensor:
        """(C,) float64: the RMS of each channel."""
        return (self.total_sq / max(self.count, 1)).sqrt()

    def prefix_scaling_factors(self, prefixes: list[int]) -> dict[int, float]:
        """DC-AE 1.5: {c: 1 / RMS of the first c channels}, the scalar factor a diffusion model on c channels uses."""
        mean_sq = self.total_sq / max(self.count, 1)
        return {c: float(1.0 / mean_sq[:c].mean().sqrt()) for c in prefixes}

    def merge(self, other: LatentAccumulator) -> LatentAccumulator:
        """Add another accumulator's sums (another shard's or rank's) into this one."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge latent statistics of {other.channels} channels into {self.channels}")
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        return self

    def state(self) -> dict:
        """The sums as plain numbers (JSON-ready, exact)."""
        return {"channels": self.channels, "count": self.count, "total": self.total.tolist(),
                "total_sq": self.total_sq.tolist()}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict) -> LatentAccumulator:
        def sums(key: str) -> torch.Tensor:
            return torch.tensor(state[key], dtype=torch.float64)

        return cls(int(state["channels"]), int(state["count"]), sums("total"), sums("total_sq"))

    def summary(self) -> dict:
        if self.count == 0:
            raise ValueError("no latents were accumulated: the dataset yielded no images")
        n = self.count
        mean_c = self.total / n  # (C,)
        var_c = (self.total_sq / n - mean_c.pow(2)).clamp_min(0)
        mean = float(self.total.sum() / (n * self.channels))
        mean_sq = float(self.total_sq.sum() / (n * self.channels))
        rms = math.sqrt(mean_sq)
        return {
            "mean": mean,
            "std": math.sqrt(max(mean_sq - mean**2, 0.0)),
            "rms": rms,
            "scaling_factor": 1.0 / rms if rms > 0 else float("inf"),  # multiply on encode (diffusers)
            "per_channel_mean": [float(v) for v in mean_c],
            "per_channel_std": [float(v) for v in var_c.sqrt()],
            "per_channel_rms": [float(v) for v in self.per_channel_rms()],
            "values_per_channel": n,
        }
