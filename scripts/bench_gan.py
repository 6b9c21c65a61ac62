"""Cost of each addition of docs/alignment.md: the extra step time relative to the phase's step without it.

One process, one model, the same seeded batches. Each configuration is a full training step (reconstruction,
generator loss and backward, AdamW step; in phase 3 also the discriminator's step) written as the trainer's step
without Lightning, so only the losses differ. The configurations are timed in rotation, one step each per round,
in an order that rotates, so machine load hits them alike; the table gives medians and the ratio to the phase's
base step.

    phase 1 base: L1 + LPIPS;   + vf, + vf without the adaptive weight, + repa, + vf + repa
    phase 3 base: PatchGAN (hinge, adaptive weight);   + diffaug, + lecam, + r1 (every step; lazy = 1/16 of the
                  extra), + collapse guard (one host sync), + dino (the DINO discriminator instead of the PatchGAN)

Foundation and trunk weights are random (no downloads); timings do not depend on their values.

    python scripts/bench_gan.py                                   # CPU, tiny variant, 128 px, batch 2
    python scripts/bench_gan.py --variant dc-ae-f32c32-sana-1.1 --resolution 256 --device cuda --batch 8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import replace

import torch

from dcae_train.losses import AutoencoderLoss, DiscConfig, LossConfig
from dcae_train.losses.config import DiffAugConfig, FoundationConfig, RepaConfig, VFConfig
from dcae_train.models import build_model
from dcae_train.training.config import PHASE3_TRAINABLE
from dcae_train.training.gan_health import CollapseGuard
from dcae_train.training.phases import freeze_all_but, select_trainable

ALL_AUG = DiffAugConfig(policy=["color", "translation", "cutout"])


def configurations(foundation: str, repa_stage: int) -> dict[int, dict[str, LossConfig]]:
    p1 = LossConfig(lpips=1.0, lpips_net="alex")
    p3 = LossConfig(lpips=1.0, lpips_net="alex", gan=0.5, disc=DiscConfig(layers=2, width=32))
    vf, repa = VFConfig(weight=0.1), RepaConfig(weight=0.5, stage=repa_stage, hidden=256)
    return {
        1: {
            "base": p1,
            "+vf": replace(p1, vf=vf),
            "+vf fixed weight": replace(p1, vf=replace(vf, adaptive_weight=False)),
            "+repa": replace(p1, repa=repa),
            "+vf+repa": replace(p1, vf=vf, repa=repa),
        },
        3: {
            "base": p3,
            "+diffaug": replace(p3, diffaug=ALL_AUG),
            "+lecam": replace(p3, lecam=0.001),
            "+r1 (every step)": replace(p3, r1=1.0, r1_every=1),
            "+collapse guard": replace(p3, collapse=replace(p3.collapse, steps=10**9)),
            "+dino disc": replace(p3, disc=DiscConfig(type="dino", trunk=foundation, width=64, norm="group")),
        },
    }


Step = Callable[[torch.Tensor, int], None]


def make_step(variant: str, phase: int, cfg: LossConfig, foundation: str, device: str) -> Step:
    """One training step of `phase` with loss `cfg`, as AutoencoderModule.training_step does it, without Lightning."""
    torch.manual_seed(0)
    model = build_model(variant).to(device)
    trainable = ["*"] if phase == 1 else PHASE3_TRAINABLE
    freeze_all_but(model, select_trainable(model, trainable, key="trainable"))
    repa_ch = model.feature_channels("encoder", cfg.repa.stage) if cfg.repa.enabled else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random LPIPS and foundation warnings
        loss = AutoencoderLoss(
            cfg, lpips_pretrained=False, foundation=FoundationConfig(model=foundation, require_pretrained=False),
            latent_channels=model.latent_channels, foundation_pretrained=False, repa_channels=repa_ch,
        ).to(device)  # fmt: skip
    opt_g = torch.optim.AdamW([p for p in (*model.parameters(), *loss.generator_parameters()) if p.requires_grad])
    disc = loss.discriminator
    opt_d = torch.optim.AdamW([p for p in disc.parameters() if p.requires_grad]) if disc is not None else None
    guard = CollapseGuard(cfg.collapse) if cfg.collapse.steps > 0 else None
    hidden: list[torch.Tensor] = []
    if loss.repa is not None:
        model.feature_module("encoder", cfg.repa.stage).register_forward_hook(lambda m, i, out: hidden.append(out))

    def step(x: torch.Tensor, i: int) -> None:
        _requires_grad(disc, False)  # Lightning's toggled_optimizer
        (z,), (x_hat,) = model.reconstruct(x)
        feats = loss.foundation_features(x, tuple(z.shape[-2:]))
        last = model.last_trainable_layer() if loss.gan_active(i) else None
        enc_last = model.encoder_last_layer() if loss.vf is not None else None
        g, _ = loss.generator_loss(
            x, x_hat, step=i, last_layer=last, z=z, encoder_last_layer=enc_last, features=feats,
            hidden=hidden.pop() if hidden else None,
        )  # fmt: skip
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        if disc is None:
            return
        _requires_grad(disc, True)
        d, logs = loss.discriminator_loss(x, x_hat.detach(), step=i)
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
        if guard is not None:
            guard.update(logs["disc_accuracy"])

    return step


def _requires_grad(module: torch.nn.Module | None, flag: bool) -> None:
    if module is None:
        return
    for name, p in module.named_parameters():
        if not name.startswith("trunk."):  # the DINO trunk stays frozen
            p.requires_grad_(flag)


def time_phase(args: argparse.Namespace, phase: int, configs: dict[str, LossConfig]) -> dict[str, list[float]]:
    steps = {name: make_step(args.variant, phase, cfg, args.foundation, args.device) for name, cfg in configs.items()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch, 3, args.resolution, args.resolution, generator=g) * 2 - 1 for _ in range(4)]
    batches = [b.to(args.device) for b in batches]
    times: dict[str, list[float]] = {name: [] for name in configs}
    names = list(steps)
    for r in range(args.warmup + args.steps):
        # One step of each configuration per round, the order rotating: a step right after an expensive one (the
        # DINO discriminator) runs slower on a CPU (caches, thread wake-up), and no configuration always follows it.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            x = batches[r % len(batches)]
            _sync(args.device)
            t0 = time.perf_counter()
            steps[name](x, r)
            _sync(args.device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def report(phase: int, times: dict[str, list[float]], lazy_every: int = 16) -> list[str]:
    base = statistics.median(times["base"])
    lines = []
    for name, ts in times.items():
        med = statistics.median(ts)
        line = f"p{phase}  {name:<18} {med * 1e3:9.1f} ms   x{med / base:5.2f}   extra {100 * (med / base - 1):+6.1f}%"
        if name.startswith("+r1"):
            line += f"   (lazy every {lazy_every}: {100 * (med / base - 1) / lazy_every:+.1f}%)"
        lines.append(line)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="tiny")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of every configuration each)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--phases", default="1,3")
    p.add_argument("--foundation", default="dinov2-vits14", help="DINOv2 of the VF/REPA losses and the DINO disc")
    p.add_argument("--repa-stage", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    args.phases = [int(v) for v in args.phases.split(",")]
    if not set(args.phases) <= {1, 3} or args.steps < 1:
        raise ValueError("--phases takes 1 and/or 3; --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = configurations(args.foundation, args.repa_stage)
    print(f"# {args.variant} @ {args.resolution} px, batch {args.batch}, {args.device}, medians of {args.steps} steps")
    for phase in args.phases:
        for line in report(phase, time_phase(args, phase, configs[phase])):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
