"""Benchmark our DCAE against diffusers `AutoencoderDC`: training step (forward + backward) time and peak memory.

Same config, same weights (copied into diffusers with strict=True), same input, same L1 loss; the table quotes
medians and the ratio ours / diffusers (< 1 = ours is faster / smaller).

On CPU each model is timed in its own fresh process, and the processes alternate (ours, diffusers, ours, ...)
for `--rounds` rounds, so machine load hits both alike. Timing both models in one process is misleading on
CPU: glibc hands freed blocks back to the OS, a step spends 20-30% of its time in first-touch page faults, and
how many depends on what the *other* model left in the heap (measured: in-process interleaving made either
model up to 10% slower depending on the order; the page-fault column shows the effect).
On GPU the two are interleaved in one process (the caching allocator makes them independent).

    python scripts/bench_model.py                      # CPU: quarter-width sana-1.1, 256 px, batch 4; ckpt at 512
    python scripts/bench_model.py --rounds 4 --steps 3 --channels-last
    python scripts/bench_model.py --device cuda        # full sana-1.1, bf16 autocast, 256/512/1024 px

CPU peak memory is the peak resident set size during one step minus the resident size before it, measured in
a child process whose glibc allocator returns large blocks to the OS at once (MALLOC_MMAP_THRESHOLD_), so
that RSS follows live tensors. GPU peak memory is `torch.cuda.max_memory_allocated` during one step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dcae_train.models import DCAE, variant_config

MIB = 2**20


@dataclass
class Case:
    name: str
    variant: str
    width: float
    size: int
    batch: int
    gradient_checkpointing: bool = False
    channels_last: bool = False


# Models and one training step ---------------------------------------------------------------------------
def build_pair(case: Case, device: str, with_diffusers: bool = True) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderDC

    config = variant_config(case.variant)
    if case.width != 1.0:
        config = config.scaled(case.width)
    torch.manual_seed(0)
    ours = DCAE(config).to(device).train()
    models: dict[str, torch.nn.Module] = {"ours": ours}
    if with_diffusers:
        ref = AutoencoderDC(**config.to_diffusers_config()).to(device).train()
        ref.load_state_dict(ours.state_dict(), strict=True)
        models["diffusers"] = ref
    if case.gradient_checkpointing:
        ours.set_gradient_checkpointing(True)
    if case.channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    return models


def make_input(case: Case, device: str) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.rand(case.batch, 3, case.size, case.size, device=device) * 2 - 1
    return x.contiguous(memory_format=torch.channels_last) if case.channels_last else x


def make_step(model: torch.nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    is_ours = isinstance(model, DCAE)

    def step() -> None:
        model.zero_grad(set_to_none=True)  # gradients are allocated inside every measured step
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            x_hat = model(x) if is_ours else model(x).sample
            loss = (x_hat.float() - x).abs().mean()
        loss.backward()

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Measurements -------------------------------------------------------------------------------------------
def time_interleaved(steps: dict[str, Callable[[], None]], n: int, warmup: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    for i in range(warmup + n):
        order = names if i % 2 == 0 else names[::-1]  # alternate who goes first
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_rss_mib(step: Callable[[], None], repeats: int = 2) -> float:
    """Peak RSS growth of one step (after a warm-up step), in MiB: the median of `repeats` steps."""
    step()
    peaks = []
    for _ in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        before = _rss_kib("VmRSS")
        step()
        peaks.append((_rss_kib("VmHWM") - before) / 1024)
    return statistics.median(peaks)


def gpu_peak_mib(step: Callable[[], None]) -> float:
    step()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MIB


def cpu_memory_in_child(case: Case, which: str, threads: int, repeats: int = 2) -> float:
    """Run `--memory-child` in a fresh process whose allocator unmaps large blocks at once."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    spec = json.dumps({**case.__dict__, "which": which, "repeats": repeats})
    cmd = [sys.executable, __file__, "--memory-child", spec, "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def time_in_children(case: Case, args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Step times and page faults per step: each model in a fresh process, alternating, `args.rounds` rounds."""
    res: dict[str, dict[str, list[float]]] = {k: {"times": [], "faults": []} for k in ("ours", "diffusers")}
    for r in range(args.rounds):
        order = ["ours", "diffusers"] if r % 2 == 0 else ["diffusers", "ours"]
        for which in order:
            spec = json.dumps({**case.__dict__, "which": which, "steps": args.steps, "warmup": args.warmup})
            cmd = [sys.executable, __file__, "--time-child", spec, "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            res[which]["times"] += got["times"]
            res[which]["faults"] += got["faults"]
    return res


def time_child(spec: str) -> None:
    d = json.loads(spec)
    which, n, warmup = d.pop("which"), d.pop("steps"), d.pop("warmup")
    case = Case(**d)
    models = build_pair(case, "cpu", with_diffusers=which == "diffusers")
    step = make_step(models[which], make_input(case, "cpu"), bf16=False)
    times, faults = [], []
    for i in range(warmup + n):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"times": times, "faults": faults}))


def memory_child(spec: str) -> None:
    d = json.loads(spec)
    which, repeats = d.pop("which"), d.pop("repeats")
    case = Case(**d)
    models = build_pair(case, "cpu", with_diffusers=which == "diffusers")
    print(cpu_peak_rss_mib(make_step(models[which], make_input(case, "cpu"), bf16=False), repeats))


# Tables -------------------------------------------------------------------------------------------------
def row(label: str, ours: float, base: float, unit: str, fmt: str = "{:.3f}") -> str:
    return f"| {label} | {fmt.format(ours)} {unit} | {fmt.format(base)} {unit} | {ours / base:.3f} |"


def run_cpu(args: argparse.Namespace) -> None:
    if args.only_checkpointing:
        return run_cpu_checkpointing(args)
    case = Case("train step", args.variant, args.width, args.size, args.batch, channels_last=args.channels_last)
    res = time_in_children(case, args)
    med = {k: statistics.median(v["times"]) for k, v in res.items()}
    flt = {k: statistics.median(v["faults"]) for k, v in res.items()}
    mem = {k: cpu_memory_in_child(case, k, args.threads, args.memory_repeats) for k in res}
    layout = "channels_last" if case.channels_last else "NCHW"
    title = f"{args.variant} x{args.width} width, {case.size} px, batch {case.batch}, fp32, {layout}"
    n = args.rounds * args.steps
    print(f"\n### CPU ({args.threads} thread(s)): {title}; median of {n} steps, {args.rounds} fresh processes each\n")
    print("| fwd+bwd step | ours | diffusers | ours / diffusers |\n|---|---|---|---|")
    print(row("time", med["ours"], med["diffusers"], "s"))
    print(row("peak RSS growth", mem["ours"], mem["diffusers"], "MiB", "{:.0f}"))
    print(row("page faults / step", flt["ours"] / 1e3, flt["diffusers"] / 1e3, "k", "{:.0f}"))
    ours_t, base_t = fmt_list(res["ours"]["times"]), fmt_list(res["diffusers"]["times"])
    print(f"\nall step times (s): ours {ours_t}; diffusers {base_t}")
    if not args.skip_checkpointing:
        run_cpu_checkpointing(args)


def run_cpu_checkpointing(args: argparse.Namespace) -> None:
    size, batch = args.ckpt_size, args.ckpt_batch
    off = Case("ckpt off", args.variant, args.width, size, batch, gradient_checkpointing=False)
    on = Case("ckpt on", args.variant, args.width, size, batch, gradient_checkpointing=True)
    r = args.memory_repeats
    mem_off = cpu_memory_in_child(off, "ours", args.threads, r)
    mem_on = cpu_memory_in_child(on, "ours", args.threads, r)
    mem_ref = cpu_memory_in_child(off, "diffusers", args.threads, r)
    models_off = build_pair(off, "cpu", with_diffusers=False)["ours"]
    models_on = DCAE(models_off.config).train()
    models_on.load_state_dict(models_off.state_dict())
    models_on.set_gradient_checkpointing(True)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    steps = {"off": make_step(models_off, x, False), "on": make_step(models_on, x, False)}
    times = time_interleaved(steps, max(2, args.steps // 2), args.warmup, "cpu")
    t_off, t_on = statistics.median(times["off"]), statistics.median(times["on"])
    print(f"\n### CPU: gradient checkpointing, ours, {args.variant} x{args.width}, {size} px, batch {batch}\n")
    print("| fwd+bwd step | checkpointing on | off | on / off |\n|---|---|---|---|")
    print(row("peak RSS growth", mem_on, mem_off, "MiB", "{:.0f}"))
    print(row("time", t_on, t_off, "s"))
    print(f"\n(diffusers, which cannot checkpoint, at the same size: peak RSS growth {mem_ref:.0f} MiB)")


def run_gpu(args: argparse.Namespace) -> None:
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"\n### GPU: {torch.cuda.get_device_name()}, full {args.variant}, bf16 autocast (fp32 weights)\n")
    print("| px | batch | model | step time (ms) | peak memory (MiB) | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for size, batch in ((256, 8), (512, 2), (1024, 1)):
        case = Case("gpu", args.variant, 1.0, size, batch)
        models = build_pair(case, "cuda")
        ckpt = DCAE(models["ours"].config).cuda().train()
        ckpt.load_state_dict(models["ours"].state_dict())
        ckpt.set_gradient_checkpointing(True)
        models["ours + ckpt"] = ckpt
        x = torch.rand(batch, 3, size, size, device="cuda") * 2 - 1
        steps = {k: make_step(m, x, bf16=True) for k, m in models.items()}
        times = time_interleaved(steps, args.steps, args.warmup, "cuda")
        mem = {k: gpu_peak_mib(s) for k, s in steps.items()}
        base_t, base_m = statistics.median(times["diffusers"]), mem["diffusers"]
        for k in steps:
            t, m = statistics.median(times[k]), mem[k]
            print(f"| {size} | {batch} | {k} | {t * 1e3:.1f} | {m:.0f} | {t / base_t:.3f} | {m / base_m:.3f} |")
        del models, steps, ckpt
        torch.cuda.empty_cache()


def fmt_list(v: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in v)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--variant", default="dc-ae-f32c32-sana-1.1")
    p.add_argument("--width", type=float, default=0.25, help="CPU width multiplier (GPU runs full width)")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ckpt-size", type=int, default=512)
    p.add_argument("--ckpt-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (CPU) or in total (GPU)")
    p.add_argument("--rounds", type=int, default=3, help="CPU: fresh processes per model, alternating")
    p.add_argument("--channels-last", action="store_true", help="both models and the input in channels_last")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-checkpointing", action="store_true")
    p.add_argument("--only-checkpointing", action="store_true")
    p.add_argument("--memory-repeats", type=int, default=2)
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--time-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child)
    if args.time_child:
        return time_child(args.time_child)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here; use --device cpu")
    print(f"torch {torch.__version__}, {device}, threads {args.threads}")
    run_gpu(args) if device == "cuda" else run_cpu(args)


if __name__ == "__main__":
    main()
