"""Measure the CPU memory of real training steps, for tests/test_cost.py (run as a fresh process).

    python tests/_helpers_cost.py PHASE WIDTH [overrides ...]   -> prints {"measured": bytes, "estimate": bytes}

The CPU allocator keeps no peak counter, so the peak is the kernel's: the resident-set high-water mark (VmHWM),
reset through /proc/self/clear_refs after the set-up, minus the resident set before anything was built. The
process is fresh so that nothing else shares it. Two steps run: the first creates the AdamW moments (the steady
state), the peak is taken over the second, with every state of a real run alive (weights, moments, EMA copy).
"""

from __future__ import annotations

import json
import re
import sys

import torch

from dcae_train import cost
from dcae_train.losses import perceptual
from dcae_train.training.ema import EMA
from dcae_train.training.optim import build_adamw


def rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1)) * 1024


def measure(phase: int, width: float, overrides: list[str]) -> dict[str, int]:
    torch.set_num_threads(2)
    cfg = cost.phase_configs(overrides)[phase - 1]
    torch.nn.functional.conv2d(torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3))  # load the conv kernels first
    base = rss("VmRSS")
    model, loss = cost.build_parts(cfg, width)
    ema = EMA.make_copy(model) if cfg.phase_config.ema.enabled else None
    opts = [build_adamw([p for p in model.parameters() if p.requires_grad], cfg.phase_config.optimizer)]
    if loss.discriminator is not None:
        opts.append(build_adamw(list(loss.discriminator.parameters()), cfg.phase_config.disc_optimizer))
    res, batch = cfg.phase_config.resolution, cfg.phase_config.batch_size
    step = max(cfg.phase_config.loss.disc_start, cfg.phase_config.loss.gan_start) if loss.discriminator else 0
    for i in range(2):
        if i == 1:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS now
        x = torch.rand(batch, 3, res, res) * 2 - 1
        with cost.autocast(cfg):  # bf16-mixed: CPU autocast for real, as the estimate simulates it
            cost.train_step(model, loss, x, step=step, prefixes=cost.step_prefixes(cfg), optimizers=opts)
        del x
    measured = rss("VmHWM") - base
    assert ema is not None or not cfg.phase_config.ema.enabled
    estimate = cost.phase_cost(cfg, width=width).memory
    # Host memory of a GPU run too, not device memory: lpips' per-process cache of its real CPU build.
    cache = sum(t.numel() * t.element_size() for sd in perceptual._CONSTRUCTED.values() for t in sd.values())
    return {"measured": measured, "estimate": estimate.total, "step_peak": estimate.step_peak, "lpips_cache": cache}


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:])))
