"""Chaos run: a seeded sequence of faults against one quickstart run, which must still end bit-identical.

One run (tiny model, CPU, deterministic, two DataLoader workers so group signals hit workers) is started, hit by
faults, resumed with `resume=auto` after each, and at the end its `final.ckpt` weights are compared tensor by
tensor (`torch.equal`) with an uninterrupted run of the same config and seed. The faults, in an order and at
steps drawn from `--seed`:

  killwrite  SIGKILL half-way through a checkpoint write (the trainer's `DCAE_TRAIN_FAULTS=killwrite@N`)
  sigterm    SIGTERM to the whole process group (`os.killpg`, as SLURM, systemd and `timeout` do): exit 75
  sigint     SIGINT (Ctrl-C) to the whole process group: exit 75
  concurrent a second `resume=auto` while the run is alive (the run is paused with SIGSTOP meanwhile, so it is
             surely still alive): refused by the run folder's lock, exit 2; the first run then continues
  corrupt    after an interruption, every checkpoint file holding the newest step is truncated: the next resume
             must fall back to an earlier step (and still end identical: the run replays the steps)
  move       after an interruption, the whole runs folder is moved; the next resume uses the new place

    python scripts/chaos.py                       # seed 0, 16 steps, in a temporary folder
    python scripts/chaos.py --seed 3 --steps 20 --workdir /tmp/chaos --keep

Exit 0 only when every process exited as expected and the final weights are equal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED, EXIT_CONFIG = 75, 2
INTERRUPTIONS = ("killwrite", "sigterm", "sigint")

# Small, fast and bitwise reproducible (the overrides of the exact mid-epoch resume test, with workers).
# epoch_batches=4: interruptions land mid-epoch too; val/image intervals beyond the run: only training steps.
CONFIG = [
    "debug=smoke",
    "data=demo",
    "data.num_workers=2",
    "validate_at_start=false",
    "phases.p1.ckpt_every=2",
    "phases.p1.log_every=1",
    "phases.p1.val_every=100000",
    "phases.p1.image_every=100000",
    "data.epoch_batches=4",
    "trainer.deterministic=true",
]


@dataclass
class Segment:
    """One training process: how it ends (an interruption at `step`, or None: runs to the end), whether a
    concurrent resume is tried while it runs, and what is done to the files after it ends."""

    ends_with: str | None
    step: int | None = None
    concurrent: bool = False
    after: list[str] = field(default_factory=list)  # "corrupt", "move", in this order


def make_plan(seed: int, steps: int) -> list[Segment]:
    """Four processes: three interrupted (killwrite, sigterm, sigint in a seeded order, at increasing seeded
    steps at least 2 apart, from step 4 so an earlier checkpoint exists to fall back to) and the last one runs
    to the end. The concurrent resume is tried during a group-signalled one; corrupt and move follow seeded
    interruptions."""
    if steps < 13:
        raise SystemExit(f"--steps must be at least 13 (got {steps}): three interruptions 2 steps apart from step 4")
    rng = random.Random(seed)
    kinds = list(INTERRUPTIONS)
    rng.shuffle(kinds)
    picks = sorted(rng.sample(range(4, steps - 6), 3))
    segments = [Segment(kind, at + 2 * i) for i, (kind, at) in enumerate(zip(kinds, picks, strict=True))]
    segments.append(Segment(None))
    rng.choice([s for s in segments if s.ends_with in ("sigterm", "sigint")]).concurrent = True
    for action in rng.sample(["corrupt", "move"], 2):
        rng.choice(segments[:3]).after.append(action)
    return segments


def describe(plan: list[Segment]) -> str:
    parts = []
    for seg in plan:
        text = f"{seg.ends_with}@{seg.step}" if seg.ends_with else "to the end"
        if seg.concurrent:
            text += " (+concurrent resume)"
        parts += [text, *seg.after]
    return " -> ".join(parts)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Chaos:
    def __init__(self, workdir: Path, steps: int) -> None:
        self.workdir, self.steps = workdir, steps
        self.runs = workdir / "runs"
        self.rows: list[tuple[str, str, str, bool]] = []

    def row(self, fault: str, expected, got, ok: bool | None = None) -> bool:
        ok = (expected == got) if ok is None else ok
        self.rows.append((fault, str(expected), str(got), ok))
        log(f"{'ok ' if ok else 'BAD'} {fault}: expected {expected}, got {got}")
        return ok

    def start(self, *extra: str, faults: str | None = None, runs: Path | None = None) -> subprocess.Popen:
        env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        env.pop("DCAE_TRAIN_RESOLVED", None)
        env.pop("DCAE_TRAIN_FAULTS", None)
        if faults:
            env["DCAE_TRAIN_FAULTS"] = faults
        args = [sys.executable, "-m", "dcae_train", f"runs_dir={runs or self.runs}", *CONFIG]
        args += [f"phases.p1.max_steps={self.steps}", *extra]
        # Own session: a group signal reaches the run and its DataLoader workers, never this script.
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)  # fmt: skip

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # workers a SIGKILLed run left
                os.killpg(proc.pid, signal.SIGKILL)
        return proc.returncode, out

    def wait_for_step(self, proc: subprocess.Popen, step: int, since: float, timeout: float = 300) -> int:
        """Wait until this process has written a checkpoint of at least `step` (modified after `since`, its start)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            best = -1
            for path in self.runs.glob("quickstart/phase1/*/checkpoints/*step*.ckpt"):
                m = re.search(r"step[-_=]?(\d+)", path.name)
                try:
                    if m and path.stat().st_mtime > since:
                        best = max(best, int(m.group(1)))
                except FileNotFoundError:  # pruned meanwhile
                    continue
            if best >= step:
                return best
            if proc.poll() is not None:
                return best
            time.sleep(0.02)
        return -1

    def run_dir(self) -> Path:
        (run,) = self.runs.glob("quickstart/phase1/*/")
        return run

    def corrupt_newest(self) -> int:
        from dcae_train.training import checkpoint as ckpt_lib

        found = ckpt_lib.checkpoints_newest_first(self.run_dir())
        newest = found[0][0]
        for step, path in found:
            if step == newest:
                size = path.stat().st_size
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                log(f"corrupt: truncated {path.relative_to(self.workdir)} (step {step}) to {size // 2} bytes")
        return newest

    def execute(self, plan: list[Segment]) -> None:
        corrupted: int | None = None
        moved: Path | None = None
        moves = 0
        for i, seg in enumerate(plan):
            extra = [] if i == 0 else ["resume=auto"]
            what = "fresh run" if i == 0 else "resume=auto"
            faults = None
            if seg.ends_with == "killwrite":
                faults = f"killwrite@{seg.step}"
                log(f"{what}, DCAE_TRAIN_FAULTS={faults}: SIGKILL half-way through the next checkpoint write")
            else:
                log(f"{what}" + (f", group {seg.ends_with.upper()} at step >= {seg.step}" if seg.ends_with else ""))
            since = time.time()  # after any corruption: truncated files are not this process's checkpoints
            proc = self.start(*extra, faults=faults)
            if seg.concurrent:
                at = self.wait_for_step(proc, 0, since)
                os.killpg(proc.pid, signal.SIGSTOP)  # paused, alive, holding its lock
                log(f"concurrent: run paused (SIGSTOP) after writing step {at}; starting a second resume=auto")
                code, out = self.finish(self.start("resume=auto"))
                os.killpg(proc.pid, signal.SIGCONT)
                refused = "in use by another process" in out
                self.row("concurrent resume=auto (run folder lock)", EXIT_CONFIG, code, code == EXIT_CONFIG and refused)
            if seg.ends_with in ("sigterm", "sigint"):
                at = self.wait_for_step(proc, seg.step, since)
                sig = signal.SIGTERM if seg.ends_with == "sigterm" else signal.SIGINT
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)
                    log(f"{sig.name} to process group {proc.pid} (checkpoint of step {at} on disk)")
            code, out = self.finish(proc)
            resumed = re.search(r"resuming (\S+) at step (\d+)", out)
            if resumed:
                log(f"  it printed: resuming {Path(resumed.group(1)).name} at step {resumed.group(2)}")
            if corrupted is not None:
                got = int(resumed.group(2)) if resumed else None
                self.row(f"corrupt newest (step {corrupted}): resume falls back", f"< {corrupted}", got,
                         got is not None and got < corrupted)  # fmt: skip
                corrupted = None
            if moved is not None:
                got = "new place" if resumed and Path(resumed.group(1)).is_relative_to(moved) else "elsewhere"
                self.row("moved runs folder: resume from the new place", "new place", got)
                moved = None
            expected = {"killwrite": -signal.SIGKILL, "sigterm": EXIT_PREEMPTED, "sigint": EXIT_PREEMPTED, None: 0}
            label = {
                "killwrite": f"SIGKILL mid-write (killwrite@{seg.step})",
                "sigterm": f"group SIGTERM (step >= {seg.step})",
                "sigint": f"group SIGINT (step >= {seg.step})",
                None: "resume=auto to the end",
            }[seg.ends_with]
            if not self.row(label, expected[seg.ends_with], code):
                print(out[-3000:], flush=True)
            for action in seg.after:
                if action == "corrupt":
                    corrupted = self.corrupt_newest()
                else:
                    moves += 1
                    target = self.workdir / f"moved-{moves}" / "runs"
                    target.parent.mkdir(parents=True)
                    shutil.move(str(self.runs), str(target))
                    log(f"move: {self.runs.relative_to(self.workdir)} -> {target.relative_to(self.workdir)}")
                    self.runs = moved = target

    def reference(self) -> Path:
        ref = self.workdir / "reference"
        log("uninterrupted reference run")
        code, out = self.finish(self.start(runs=ref))
        if not self.row("uninterrupted reference run", 0, code):
            print(out[-3000:], flush=True)
        return ref


def equal_weights(a: Path, b: Path) -> tuple[bool, list[str]]:
    import torch

    sa = torch.load(a, weights_only=True, map_location="cpu")["state_dict"]
    sb = torch.load(b, weights_only=True, map_location="cpu")["state_dict"]
    if sa.keys() != sb.keys():
        return False, sorted(set(sa) ^ set(sb))
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    return not differ, differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0, help="draws the order of the faults and their steps")
    p.add_argument("--steps", type=int, default=16, help="training steps of the run (at least 13)")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    args = p.parse_args(argv)
    plan = make_plan(args.seed, args.steps)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dcae-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if any(workdir.iterdir()):
        raise SystemExit(f"--workdir {workdir} is not empty: give an empty or new folder")
    started = time.monotonic()
    log(f"seed {args.seed}, {args.steps} steps, work folder {workdir}")
    log(f"plan: {describe(plan)}")
    chaos = Chaos(workdir, args.steps)
    try:
        chaos.execute(plan)
        ref = chaos.reference()
        final = chaos.run_dir() / "checkpoints" / "final.ckpt"
        want = ref.glob("quickstart/phase1/*/checkpoints/final.ckpt")
        same, differ = (False, ["no final.ckpt"])
        if final.is_file() and (ref_final := next(want, None)) is not None:
            same, differ = equal_weights(final, ref_final)
        header = ("fault", "expected", "got")
        w = [max(len(str(r[i])) for r in [header, *chaos.rows]) for i in range(3)]
        print(f"\n{header[0]:<{w[0]}}  {header[1]:>{w[1]}}  {header[2]:>{w[2]}}  ok")
        for fault, expected, got, ok in chaos.rows:
            print(f"{fault:<{w[0]}}  {expected:>{w[1]}}  {got:>{w[2]}}  {'yes' if ok else 'NO'}")
        print(f"\nfinal weights equal the uninterrupted run's: {'yes' if same else 'no'}")
        if not same:
            print(f"  differing tensors ({len(differ)}): {', '.join(differ[:8])}")
        print(f"wall time {time.monotonic() - started:.0f} s")
        return 0 if same and all(r[3] for r in chaos.rows) else 1
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
