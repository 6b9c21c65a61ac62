"""Training-step benchmark: our trainer against a plain PyTorch baseline, in one run, on the same inputs.

For each case (phase, resolution) it runs three configurations on the same seeded batches and reports medians:

  ours      `AutoencoderModule` driven by a Lightning `Trainer` (CSV logging on, EMA on, the recipe's phase:
            frozen prefixes without a graph, channels_last, bf16 autocast on GPU, fused AdamW on GPU, optional
            torch.compile, activation checkpointing for phase 2 at >= 512 px); its time is the batch time end
            to end (data fetch, Lightning, logging, EMA)
  plain     the same model, loss and optimizer logic as ours in a hand-written loop (no Lightning): the
            reference for Lightning and logging overhead
  baseline  diffusers `AutoencoderDC` (same config, same weights) + `lpips.LPIPS(net="vgg")` + torch AdamW in a
            hand-written fp32 loop, L1 + LPIPS, always the full model (phases 2/3 included)

Each configuration runs in its own fresh process (this script re-run with --child), `--rounds` times with the
order rotating, so machine load and allocator state hit all three alike (see `time_case`). The same process
measures the peak memory of a step: on CUDA the allocator's `max_memory_allocated` (absolute: weights +
optimizer + activations), on CPU the peak RSS (VmHWM) above the RSS before the first step.
LPIPS uses a random trunk everywhere (no downloads); timings do not depend on the trunk's values.

    python scripts/bench_train.py --quick                     # CPU, quarter-width sana-1.1, < 3 min
    python scripts/bench_train.py                             # CPU, p1@256, p2@512, p3@256
    python scripts/bench_train.py --device cuda --width 1 --batch 8 --cases 1@256,2@1024,3@256 --compile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU column; --peak-tflops overrides.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
P2_TRAINABLE = ["encoder.conv_out.*", "decoder.conv_in.*"]
P3_TRAINABLE = ["decoder.norm_out.*", "decoder.conv_out.*"]


@dataclass
class Case:
    phase: int
    resolution: int

    @property
    def name(self) -> str:
        return f"p{self.phase}@{self.resolution}"


@dataclass
class Settings:
    variant: str
    width: float
    device: str
    precision: str  # "32" or "bf16-mixed" (ours and plain; the baseline is always fp32)
    batch: int
    steps: int
    warmup: int
    channels_last: bool
    compile: bool
    checkpoint_p2_from: int  # phase 2 at >= this resolution uses activation checkpointing
    seed: int = 0


# Parsing ------------------------------------------------------------------------------------------------
def parse_cases(text: str) -> list[Case]:
    cases = []
    for item in text.split(","):
        try:
            phase, res = item.strip().split("@")
            case = Case(int(phase.lstrip("p")), int(res))
        except ValueError:
            raise ValueError(f"--cases item {item!r}: use PHASE@RES, e.g. --cases 1@256,2@512,3@256") from None
        if case.phase not in (1, 2, 3):
            raise ValueError(f"--cases item {item!r}: phase must be 1, 2 or 3")
        if case.resolution % 32:
            raise ValueError(f"--cases item {item!r}: the resolution must be a multiple of 32 (f32 models)")
        cases.append(case)
    return cases


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="dc-ae-f32c32-sana-1.1")
    p.add_argument("--width", type=float, default=None, help="width multiplier (default: 0.25 on CPU, 1 on GPU)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "32", "bf16-mixed"])
    p.add_argument("--batch", type=int, default=None, help="per-step batch (default: 2 on CPU, 8 on GPU)")
    p.add_argument("--cases", default=None, help="PHASE@RES list (default: 1@256,2@512,3@256; GPU adds 2@1024)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    p.add_argument("--quick", action="store_true", help="small cases and few steps: < 3 min on CPU")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile ours and plain (compile time reported)")
    p.add_argument("--checkpoint-p2-from", type=int, default=512, help="phase 2 checkpointing from this resolution")
    p.add_argument("--rounds", type=int, default=None, help="fresh processes per config (default 2; quick 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the GPU for MFU")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one configuration's run
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    gpu = args.device == "cuda"
    args.width = args.width if args.width is not None else (1.0 if gpu else 0.25)
    quick_batch = 1 if args.quick else None
    args.batch = args.batch if args.batch is not None else (quick_batch or (8 if gpu else 2))
    args.precision = args.precision if args.precision != "auto" else ("bf16-mixed" if gpu else "32")
    default_cases = "1@256,2@512,2@1024,3@256" if gpu else "1@256,2@512,3@256"
    if args.quick:
        default_cases = "1@128,2@256,3@128"
    args.cases = parse_cases(args.cases or default_cases)
    args.steps = args.steps if args.steps is not None else (2 if args.quick else 5)
    args.warmup = args.warmup if args.warmup is not None else 1
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)
    for key in ("batch", "steps", "rounds"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key}={getattr(args, key)} must be >= 1")
    if not 0 < args.width <= 1:
        raise ValueError(f"--width={args.width} must be in (0, 1], e.g. 0.25 for quarter width")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(
        variant=args.variant,
        width=args.width,
        device=args.device,
        precision=args.precision,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        channels_last=args.channels_last,
        compile=args.compile,
        checkpoint_p2_from=args.checkpoint_p2_from,
    )


# Building the three configurations ----------------------------------------------------------------------
def make_batches(s: Settings, case: Case, n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(s.seed)
    shape = (s.batch, 3, case.resolution, case.resolution)
    return [{"image": torch.rand(shape, generator=g) * 2 - 1} for _ in range(n)]


def build_dcae(s: Settings):
    from dcae_train.models import build_model, variant_config

    cfg = variant_config(s.variant)
    if s.width != 1:
        cfg = cfg.scaled(width=s.width)
    torch.manual_seed(s.seed)
    return build_model(cfg)


def phase_config(s: Settings, case: Case):
    from dcae_train.losses import DiscConfig, LossConfig
    from dcae_train.training.config import EMAConfig, OptimizerConfig, PhaseConfig

    loss = LossConfig(l1=1.0, lpips=1.0)
    trainable = ["*"]
    optim = OptimizerConfig(lr=6.4e-5, betas=[0.9, 0.999])
    if case.phase == 2:
        trainable = P2_TRAINABLE
    if case.phase == 3:
        trainable = P3_TRAINABLE
        # The steady state of the released p3 (after gan_start): D trains and G gets the adaptive GAN term.
        loss = LossConfig(l1=1.0, lpips=1.0, gan=0.5, disc=DiscConfig(), disc_start=0, gan_start=0)
        optim = OptimizerConfig(lr=5.4e-5, betas=[0.5, 0.9])
    return PhaseConfig(
        resolution=case.resolution,
        batch_size=s.batch,
        max_steps=10**6,
        trainable=trainable,
        loss=loss,
        optimizer=optim,
        ema=EMAConfig(enabled=True, decay=0.9999, warmup_steps=2000),
        log_every=10 if case.phase == 1 else 50,
    )


def build_ours(s: Settings, case: Case, model: nn.Module | None = None):
    """Our module as `build_run` makes it (model + loss + phase), on the benchmark's device."""
    from dcae_train.losses import AutoencoderLoss
    from dcae_train.training.module import AutoencoderModule
    from dcae_train.weights.checkpoint import CheckpointMeta

    model = copy.deepcopy(model) if model is not None else build_dcae(s)
    if case.phase == 2 and case.resolution >= s.checkpoint_p2_from:
        model.set_gradient_checkpointing(True)  # phase 2 high-res: memory binds
    if s.channels_last:
        model = model.to(memory_format=torch.channels_last)
    phase = phase_config(s, case)
    loss = AutoencoderLoss(phase.loss, lpips_pretrained=False)
    meta = CheckpointMeta(model.config.to_dict(), None, model.scaling_factor, case.phase, "bench", None, False)
    module = AutoencoderModule(model, loss, phase, meta=meta, channels_last=s.channels_last)
    if s.compile:
        model.compile()
    return module


class Baseline:
    """diffusers AutoencoderDC + lpips.LPIPS(vgg) + AdamW, fp32, full model, L1 + LPIPS: the plain reference."""

    def __init__(self, s: Settings, model: nn.Module) -> None:
        import lpips
        from diffusers import AutoencoderDC

        self.device = torch.device(s.device)
        self.ae = AutoencoderDC(**model.config.to_diffusers_config())
        self.ae.load_state_dict(model.state_dict())  # same weights (our keys are the diffusers keys)
        self.ae.to(self.device).train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        self.lpips.to(self.device).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(self.ae.parameters(), lr=6.4e-5, weight_decay=0.0)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        x_hat = self.ae(x).sample
        loss = (x_hat - x).abs().mean() + self.lpips(x_hat, x).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


class Plain:
    """Ours without Lightning: the same module's reconstruct/loss/clip/AdamW/D step/EMA in a hand-written loop."""

    def __init__(self, s: Settings, case: Case, model: nn.Module) -> None:
        from dcae_train.training.optim import clip_grad_norm

        self._clip = clip_grad_norm
        self.device = torch.device(s.device)
        self.m = build_ours(s, case, model).to(self.device)
        self.m.train()
        (self.opt_g, *rest), (self.sched_g, *rest_s) = self.m.configure_optimizers()
        self.opt_d = rest[0] if rest else None
        self.sched_d = rest_s[0] if rest_s else None
        self.bf16 = s.precision == "bf16-mixed"
        self.channels_last = s.channels_last
        self.step_i = 0
        self.last_layer = self.m.model.last_trainable_layer()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        m, loss_fn, ph = self.m, self.m.loss, self.m.phase
        x = x.to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
        disc = loss_fn.discriminator
        if disc is not None:
            disc.requires_grad_(False)  # as Lightning's toggled_optimizer
        with self._autocast():
            (z,), (x_hat,) = m.model.reconstruct(x)
            loss, _ = loss_fn.generator_loss(x, x_hat, step=self.step_i, last_layer=self.last_layer)
        loss.backward()
        self._clip(self.opt_g, ph.optimizer.grad_clip)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        self.sched_g.step()
        if disc is not None:
            disc.requires_grad_(True)
            with self._autocast():
                d_loss, _ = loss_fn.discriminator_loss(x, x_hat.detach(), step=self.step_i)
            if d_loss is not None:
                d_loss.backward()
                self._clip(self.opt_d, ph.disc_optimizer.grad_clip)
                self.opt_d.step()
            self.opt_d.zero_grad(set_to_none=True)
            self.sched_d.step()
        if m.ema is not None:
            m.ema_helper.update(m.ema, m.model, self.step_i + 1)
        self.step_i += 1
        return loss.detach()


def make_trainer(s: Settings, max_steps: int, callbacks: list, log_dir: str):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="gpu" if s.device == "cuda" else "cpu",
        devices=1,
        precision=s.precision,
        max_steps=max_steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=CSVLogger(log_dir, name="", version=""),
        log_every_n_steps=10,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def loader(batches: list[dict[str, torch.Tensor]], device: str):
    # Pinned host memory on GPU so the H2D copy overlaps (as the real data module does).
    return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False, pin_memory=device == "cuda")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# Timing and memory: one fresh process per (case, configuration), alternating ------------------------------
def time_case(s: Settings, case: Case, rounds: int) -> dict[str, Any]:
    """Each configuration runs in its own child process (warm-up + timed steps, peak memory), `rounds` times, the
    order rotating every round. In one process the configurations would share the allocator: on CPU a step
    spends 20-30% of its time in first-touch page faults, and how many depends on what the previous
    configuration left in the heap, which skews in-process comparisons by up to 10% either way."""
    names = ["ours", "plain", "baseline"]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    for r in range(rounds):
        for which in names[r % 3 :] + names[: r % 3]:
            runs[which].append(run_child(s, case, which))
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        timed = [t for run in rs for t in run["times"][s.warmup :]]
        med = statistics.median(timed)
        out[name] = {"step_s": med, "images_s": s.batch / med, "first_s": rs[0]["times"][0], "all_s": timed}
    out["memory"] = {
        k: {"peak_gib": statistics.median(run["peak_gib"] for run in rs), "kind": rs[0]["kind"]}
        for k, rs in runs.items()
    }
    model = build_dcae(s)
    out["flops"] = count_flops(s, case, model, make_batches(s, case, 1)[0]["image"])
    return out


def child_run(spec: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: warm-up + timed steps of one configuration; step times and the step peak memory."""
    s = Settings(**spec["settings"])
    case = Case(**spec["case"])
    which = spec["which"]
    dev = torch.device(s.device)
    model = build_dcae(s)
    batches = make_batches(s, case, s.warmup + s.steps)
    state: dict[str, Any] = {"times": []}

    def start() -> None:
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        if dev.type == "cpu":  # reset the RSS high-water mark (VmHWM) to the current RSS (Linux)
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        state["rss0"] = _rss_bytes()
        state["t"] = time.perf_counter()

    def lap() -> None:
        sync(dev)
        now = time.perf_counter()
        state["times"].append(now - state["t"])
        state["t"] = now

    if which == "ours":
        import lightning as L

        class Timer(L.Callback):
            """Batch time end to end (data fetch, Lightning, logging, EMA), from one batch end to the next."""

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                if batch_idx == 0:
                    start()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                lap()

        module = build_ours(s, case, model)
        del model
        with tempfile.TemporaryDirectory() as log_dir:
            trainer = make_trainer(s, len(batches), [Timer()], log_dir)
            trainer.fit(module, train_dataloaders=loader(batches, s.device))
    else:
        runner = Baseline(s, model) if which == "baseline" else Plain(s, case, model)
        del model
        start()
        for b in batches:
            runner.step(b["image"])
            lap()
    if dev.type == "cuda":
        return {
            "times": state["times"],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "kind": "cuda max_memory_allocated",
        }
    # VmHWM, not ru_maxrss: a child keeps its parent's ru_maxrss across fork + exec (measured: 8 GiB "peaks" for
    # a 2 GiB step when the parent had just counted FLOPs of a 512 px step).
    peak = _status_kib("VmHWM") * 1024
    return {"times": state["times"], "peak_gib": (peak - state["rss0"]) / 2**30, "kind": "step peak RSS"}


def run_child(s: Settings, case: Case, which: str) -> dict[str, Any]:
    spec = json.dumps({"settings": asdict(s), "case": asdict(case), "which": which})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child for {which} {case.name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def count_flops(s: Settings, case: Case, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one training step (forward + backward + loss) with torch's flop counter, ours (plain) and baseline."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    runners = {"baseline": lambda: Baseline(s, model), "ours": lambda: Plain(s, case, model)}
    for name, make in runners.items():
        runner = make()
        if isinstance(runner, Plain) and s.compile:
            runner.m.model._compiled_call_impl = None  # count the eager graph (compiled regions hide their ops)
        with FlopCounterMode(display=False) as counter:
            runner.step(x)
        out[name] = float(counter.get_total_flops())
        del runner
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Report -------------------------------------------------------------------------------------------------------
def gpu_peak_tflops(args: argparse.Namespace) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def table(s: Settings, results: dict[str, dict], peak_tflops: float | None) -> str:
    head = (
        "| case | config | median step (s) | images/s | vs baseline (speed) | peak mem (GiB) | mem vs baseline "
        "| GFLOP/step | achieved TFLOP/s | MFU |"
    )
    rows = [head, "|" + "---|" * 10]
    for name, r in results.items():
        base = r["baseline"]
        for cfg in ("ours", "plain", "baseline"):
            t = r[cfg]
            mem = r.get("memory", {}).get(cfg, {}).get("peak_gib")
            base_mem = r.get("memory", {}).get("baseline", {}).get("peak_gib")
            flops = r["flops"]["baseline" if cfg == "baseline" else "ours"]
            tflops = flops / t["step_s"] / 1e12
            mfu = f"{100 * tflops / peak_tflops:.1f}%" if peak_tflops else "-"
            rows.append(
                f"| {name} | {cfg} | {t['step_s']:.3f} | {t['images_s']:.2f} "
                f"| {fmt_ratio(base['step_s'], t['step_s'])} "
                f"| {'-' if mem is None else f'{mem:.3f}'} | {fmt_ratio(mem, base_mem)} | {flops / 1e9:.1f} "
                f"| {tflops:.3f} | {mfu} |"
            )
    return "\n".join(rows)


def _verdict(ok: bool) -> str:
    return "OK" if ok else "NOT MET"


def criteria(results: dict[str, dict]) -> list[str]:
    """The issue's done-when checks that this run's cases allow."""
    lines = []
    p1 = next((r for n, r in results.items() if n.startswith("p1@")), None)
    if p1:
        ratio = p1["ours"]["step_s"] / p1["baseline"]["step_s"]
        lines.append(f"p1 ours/baseline step time: {ratio:.2f} (want <= 1.00) {'OK' if ratio <= 1 else 'NOT MET'}")
        over = p1["ours"]["step_s"] / p1["plain"]["step_s"] - 1
        lines.append(f"p1 Lightning+logging overhead vs plain loop: {100 * over:+.1f}% (want <= +5%)")
    for name, r in results.items():
        same_res = p1 is not None and p1["resolution"] == r["resolution"]
        if name.startswith("p3@") and same_res:
            ratio = r["ours"]["step_s"] / p1["ours"]["step_s"]
            lines.append(f"{name} ours / p1 ours step time: {ratio:.2f} (want <= 0.50) {_verdict(ratio <= 0.5)}")
        if name.startswith("p2@") and "memory" in r:
            ratio = r["memory"]["ours"]["peak_gib"] / r["memory"]["baseline"]["peak_gib"]
            lines.append(f"{name} ours / baseline peak memory: {ratio:.2f} (want <= 0.50) {_verdict(ratio <= 0.5)}")
    return lines


def machine_line(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return f"device: {torch.cuda.get_device_name()}"
    load = os.getloadavg()
    return f"device: CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load avg {load[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_run(json.loads(args.child))))
        return
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    s = settings_from(args)
    print(f"# bench_train: {s.variant} x{s.width} width, batch {s.batch}, {s.precision}, device {s.device}")
    print(
        f"# {machine_line(args)}; per config {args.rounds} fresh process(es) x ({s.warmup} warm-up + {s.steps} timed "
        "steps), medians"
    )
    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    for case in args.cases:
        t0 = time.perf_counter()
        r = time_case(s, case, args.rounds)
        r["resolution"] = case.resolution
        results[case.name] = r
        med = {k: round(r[k]["step_s"], 3) for k in ("ours", "plain", "baseline")}
        print(f"# {case.name} done in {time.perf_counter() - t0:.0f}s: median step {med}", flush=True)
        spread = "; ".join(f"{k} {' '.join(f'{t:.2f}' for t in r[k]['all_s'])}" for k in ("ours", "plain", "baseline"))
        print(f"#   all timed steps (s): {spread}", flush=True)
    print()
    print(table(s, results, gpu_peak_tflops(args)))
    print()
    kind = "CUDA max_memory_allocated" if s.device == "cuda" else "step peak RSS (child process per config)"
    print(f"memory: {kind}; ours and plain train only the phase's parameters, the baseline the full model")
    for name, r in results.items():
        first = r["ours"]["first_s"] - r["ours"]["step_s"]
        if s.compile:
            print(f"{name}: compile + first-step overhead (ours) {first:.1f}s")
    for line in criteria(results):
        print(line)
    print(f"# total {time.perf_counter() - t_all:.0f}s, load avg now {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
