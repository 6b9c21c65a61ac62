"""Preemption and fault injection.

Preemption: SIGTERM (what schedulers send before a kill) and SIGUSR1 (SLURM's pre-timeout signal with
`#SBATCH --signal=USR1@90`) set a flag; at the next step boundary the run writes a checkpoint (atomically,
also as last.ckpt), stops cleanly and the process exits with `EXIT_PREEMPTED` (75, EX_TEMPFAIL), so a
wrapper runs `resume=auto` again: `scripts/launch_slurm.sh` requeues the job on 75 and the requeued job resumes.
Under SLURM too this callback owns SIGUSR1 (the trainer turns Lightning's own auto-requeue off), so there is one
preemption path everywhere (docs/troubleshooting.md, docs/training.md).

Fault injection, for the chaos tests only: `DCAE_TRAIN_FAULTS="nan@3,nan@3,sigterm@5,kill@6"` makes the loss of
the next two batches at step 3 NaN (each entry fires once; a skipped batch does not advance the step), sends
SIGTERM to the process at step 5, and SIGKILLs it after step 6 (`killwrite@N`: half-way through the next
checkpoint write instead). Unset in normal runs: the callback is not even installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch

EXIT_PREEMPTED = 75
FAULTS_ENV = "DCAE_TRAIN_FAULTS"


class Preemption(L.Callback):
    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.requested: str | None = None  # the signal this process received
        self.preempted = False  # set on every rank once any rank was signalled: the run stopped to be resumed
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def on_train_start(self, trainer, pl_module) -> None:
        # Registered after Lightning's own handlers (installed when fit starts), so ours decide.
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self._broadcast(trainer)
        if not requested:
            return
        ckpt = self.run_dir / "checkpoints" / f"preempt-step{trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        trainer.save_checkpoint(self.run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        trainer.should_stop = True
        self.preempted = True  # read by FinishedMarker and by the CLI for the exit code
        pl_module.print(f"preempted by {self.requested or 'a signal on another rank'}: saved {ckpt}; exiting")

    def _broadcast(self, trainer) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item())

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, prev in self._previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, prev)
        self._previous.clear()


def parse_faults(spec: str | None) -> dict[int, list[str]]:
    faults: dict[int, list[str]] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kind, _, step = item.partition("@")
        if kind not in ("nan", "kill", "killwrite", "sigterm") or not step.isdigit():
            raise ValueError(f"{FAULTS_ENV}: bad entry {item!r}; use nan@N, kill@N, killwrite@N or sigterm@N")
        faults.setdefault(int(step), []).append(kind)
    return faults


class FaultInjection(L.Callback):
    """Chaos testing only (installed when DCAE_TRAIN_FAULTS is set)."""

    def __init__(self, spec: str) -> None:
        self.faults = parse_faults(spec)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        kinds = self.faults.get(trainer.global_step + 1, [])
        if "nan" in kinds:
            kinds.remove("nan")  # once: a skipped step does not advance global_step, so it would fire again
            pl_module.inject_nan_loss = True
        if "sigterm" in kinds:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kinds = self.faults.get(trainer.global_step, [])
        if "kill" in kinds:
            os.kill(os.getpid(), signal.SIGKILL)
        if "killwrite" in kinds:
            _kill_during_next_save()


def _kill_during_next_save() -> None:
    """SIGKILL the process half-way through writing the next checkpoint file."""
    original = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"PK\x03\x04 partial checkpoint bytes")
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
        return original(obj, f, *args, **kwargs)

    torch.save = dying_save
