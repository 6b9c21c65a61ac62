"""What each rank of a run did, and that the replicas agree: `<run_dir>/ranks.json`, written by global rank 0.

At the end of fit every rank contributes one entry: its host, global, node and local rank, the steps it ran, the
shards it read in its last epoch, and a fingerprint of its weights (autoencoder, EMA copy, discriminator). DDP keeps
the replicas identical by construction; a parameter frozen or unfrozen after DDP wrapped it, or a rank that skipped
an update the others made, breaks that silently (docs/troubleshooting.md). Differing fingerprints stop the run with
an error naming the ranks, before the run is marked finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from dcae_train.data.shards import write_atomic

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# What gloo's transport raises (as a plain RuntimeError) when a peer died or stopped answering.
GLOO_PEER_LOST = ("gloo", "pair closure", "closed by peer", "reset by peer", "Timed out waiting")


def is_lost_rank(err: BaseException) -> bool:
    """A collective failed because another rank died, hung or lost its network: torch's distributed errors (NCCL,
    the store) or gloo's transport errors ("Connection closed by peer", "Application timeout caused pair closure")."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(sign in str(err) for sign in GLOO_PEER_LOST)
    )


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every parameter's bits. Exact and independent of reduction order (integer sums, which wrap
    deterministically), computed where the weights live: equal weights give equal strings on any rank."""
    sums = []
    for p in module.parameters():
        bits = p.detach().contiguous().view(_INT_OF_SIZE[p.element_size()]).to(torch.int64)
        sums.append(torch.stack([bits.sum(), (bits * bits).sum()]))
    stacked = torch.stack(sums).cpu() if sums else torch.zeros(0, dtype=torch.int64)
    return hashlib.sha256(stacked.numpy().tobytes()).hexdigest()[:16]


def mismatched_ranks(entries: list[dict[str, Any]]) -> dict[str, list[int]] | None:
    """{fingerprint: [global ranks]} when the ranks do not all hold the same weights, else None."""
    groups: dict[str, list[int]] = defaultdict(list)
    for e in entries:
        groups[e["fingerprint"]].append(e["global_rank"])
    return dict(groups) if len(groups) > 1 else None


def gather_objects(obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order (just `[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class RankReport(L.Callback):
    """Collects the shards each rank reads; at the end of fit writes ranks.json and checks the replicas agree."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "ranks.json"
        self._shards: set[str] = set()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._shards = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(batch, dict):
            self._shards.update(batch.get("url", ()))

    def on_train_end(self, trainer, pl_module) -> None:
        entries = gather_objects(self._entry(trainer, pl_module))
        if trainer.is_global_zero:
            write_atomic(self.path, json.dumps({"world_size": len(entries), "ranks": entries}, indent=2).encode())
        groups = mismatched_ranks(entries)
        if groups:
            found = "; ".join(f"ranks {ranks} hold {fp}" for fp, ranks in groups.items())
            raise RuntimeError(f"the replicas' weights differ at step {trainer.global_step}: {found} ({self.path})")

    def _entry(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(pl_module.device),
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "shards_last_epoch": sorted(self._shards),
            "fingerprint": weights_fingerprint(pl_module),
        }
