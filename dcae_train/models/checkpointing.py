"""Per-block activation (gradient) checkpointing that is safe with BatchNorm.

A checkpointed block runs its forward twice in training (once without saving activations, once during
backward). A BatchNorm in train mode would update its running statistics on both passes, so checkpointing
would change the model. `_KeepBatchNormStats` snapshots the running buffers before the recomputation and puts
them back after it, so checkpointing on and off give the same gradients *and* the same running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _keep_batchnorm_stats(bns: list[_BatchNorm]) -> Iterator[None]:
    saved = [[b.detach().clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)] for bn in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, bufs in zip(bns, saved, strict=True):
                for live, old in zip((bn.running_mean, bn.running_var, bn.num_batches_tracked), bufs, strict=True):
                    live.copy_(old)


def _tracking_batchnorms(module: nn.Module) -> list[_BatchNorm]:
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]


def run_block(
    block: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    enabled: bool,
    modules: Sequence[nn.Module] | None = None,
) -> torch.Tensor:
    """`block(x)`, checkpointed when `enabled` and autograd is recording.

    `modules`: the modules `block` runs (default: `block` itself, which must then be an `nn.Module`).
    """
    mods = list(modules) if modules is not None else [block]  # type: ignore[list-item]
    if not (enabled and torch.is_grad_enabled() and (x.requires_grad or _has_trainable(mods))):
        return block(x)
    bns = [bn for m in mods for bn in _tracking_batchnorms(m)]
    if not bns:
        return checkpoint(block, x, use_reentrant=False)
    return checkpoint(
        block,
        x,
        use_reentrant=False,
        context_fn=lambda: (contextlib.nullcontext(), _keep_batchnorm_stats(bns)),
    )


def _has_trainable(modules: Sequence[nn.Module]) -> bool:
    return any(p.requires_grad for m in modules for p in m.parameters())


class Stage(nn.Sequential):
    """An `nn.Sequential` of blocks (same state_dict keys: `<stage>.<j>.*`) that can checkpoint each block."""

    gradient_checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = run_block(block, x, self.gradient_checkpointing)
        return x
