"""Exponential moving average of the autoencoder weights, with DC-Gen's warm-up.

Held by the LightningModule as `self.ema` (a plain `DCAE`), so its state_dict keys are `ema.<diffusers key>`
and any loader that reads our checkpoints can pick it. Only parameters that train in this phase are averaged;
frozen ones stay equal to the raw weights they were copied from.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class EMA:
    def __init__(self, decay: float, warmup_steps: int = 0) -> None:
        self.decay = decay  # in [0, 1): EMAConfig checks it
        self.warmup_steps = warmup_steps

    def effective_decay(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-step / self.warmup_steps))

    @staticmethod
    def make_copy(model: nn.Module) -> nn.Module:
        ema = copy.deepcopy(model).eval()
        ema.requires_grad_(False)  # deepcopy keeps requires_grad=True; the average is never trained
        return ema

    @torch.no_grad()
    def update(self, ema: nn.Module, model: nn.Module, step: int) -> None:
        decay = self.effective_decay(step)
        ema_params, params = [], []
        model_params = dict(model.named_parameters())
        for name, p_ema in ema.named_parameters():
            p = model_params[name]
            if p.requires_grad:
                ema_params.append(p_ema)
                params.append(p.detach())
        if ema_params:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        # Buffers (BatchNorm running statistics) follow the raw model.
        for b_ema, b in zip(ema.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
