"""The collapse guard: counts discriminator steps on which D wins outright and trips after N in a row.

What it watches is D's accuracy (`disc_accuracy` in the logs: the share of patch logits on the right side of 0).
A D that is right about nearly every patch of real and fake images gives the generator saturated, uninformative
gradients; long GAN runs that diverge show this first (together with logits_real and logits_fake drifting apart).
Its counters are buffers, so a resumed run continues the streak and keeps the number of trips.
"""

from __future__ import annotations

import torch
from torch import nn

from dcae_train.losses.config import CollapseGuardConfig


class CollapseGuard(nn.Module):
    def __init__(self, config: CollapseGuardConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("streak", torch.zeros((), dtype=torch.long))  # consecutive D steps above the threshold
        self.register_buffer("trips", torch.zeros((), dtype=torch.long))  # times the guard acted in this phase

    @property
    def enabled(self) -> bool:
        return self.config.steps > 0

    def update(self, accuracy: torch.Tensor | float) -> bool:
        """Count one discriminator step; True when this step completes a collapse (the streak then restarts)."""
        if float(accuracy) > self.config.accuracy:  # host sync, only with the guard on
            self.streak += 1
        else:
            self.streak.zero_()
        if int(self.streak) < self.config.steps:
            return False
        self.streak.zero_()
        self.trips += 1
        return True
