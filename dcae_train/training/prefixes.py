"""Which latent channel prefixes one training step trains on (DC-AE 1.5, structured latent).

Per step and per rank, never per sample, as DC-Gen's trainer: draws are uniform with replacement over the
candidate list, after the fixed ones (`always_min_max`: the smallest and the full width; `always_full`: the full
width). The generator is seeded by (run seed, step, rank) alone, so a resumed run draws exactly what the
uninterrupted one drew, and ranks draw differently (the rows of the output conv a rank does not use get zero
gradient, so DDP needs no unused-parameter search).
"""

from __future__ import annotations

import random

from dcae_train.training.config import LatentPrefixConfig


def sample_prefixes(cfg: LatentPrefixConfig, *, seed: int, step: int, rank: int) -> list[int] | None:
    """The prefixes of this step, or None when structured-latent training is off (the full latent)."""
    c = cfg.channels
    if not c:
        return None
    rng = random.Random(f"dcae_train/latent_prefixes/{seed}/{step}/{rank}")
    fixed = [c[0], c[-1]] if cfg.always_min_max else [c[-1]] if cfg.always_full else []
    return fixed + [rng.choice(c) for _ in range(cfg.samples - len(fixed))]
