"""The optimizers and learning-rate schedules of a phase, and the gradient-norm clip they share.

AdamW over the trainable parameters only, with no weight decay on norm weights and biases (DC-Gen: keys
matching `norm.weight` and `bias`; here: every parameter with fewer than 2 dimensions); a linear warm-up from
lr * warmup_start_factor, then constant or cosine. Fused AdamW on CUDA takes `found_inf` and skips a non-finite
step inside its kernel, which lets the trainer guard steps without a host sync (see `module.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dcae_train.training.config import OptimizerConfig


def build_adamw(params: Sequence[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.AdamW:
    if not params:
        raise ValueError("no trainable parameters for an optimizer: check the phase's `trainable` globs")
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = cfg.fused if cfg.fused is not None else all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, max_steps))


def lr_factor(cfg: OptimizerConfig, max_steps: int) -> Callable[[int], float]:
    """step -> lr / peak lr: linear warm-up, then 1 (constant) or a cosine to min_lr_factor at max_steps."""

    def factor(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(max_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """A fused torch optimizer (AdamW(fused=True)) takes `found_inf` and skips the update inside its kernel."""
    return bool(optimizer.defaults.get("fused"))


def clip_grad_norm(optimizer: torch.optim.Optimizer, max_norm: float | None) -> torch.Tensor:
    """The global gradient norm of the optimizer's parameters (clipped to max_norm when given), on the device."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)
