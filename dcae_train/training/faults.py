"""Preemption and fault injection.

Preemption: SIGTERM (what schedulers send before a kill), SIGUSR1 (SLURM's pre-timeout signal with
`#SBATCH --signal=USR1@90`) and a first SIGINT (Ctrl-C) set a flag; at the next step boundary the run writes a
checkpoint (atomically, also as last.ckpt), stops cleanly and the process exits with `EXIT_PREEMPTED` (75,
EX_TEMPFAIL), so a wrapper runs `resume=auto` again: `scripts/launch_slurm.sh` requeues the job on 75 and the
requeued job resumes. A second SIGINT aborts at once. The CLI installs the handlers before it builds anything
(`preemption_signals()`), so a signal during start-up or the start-up validation also ends in 75. Schedulers
signal the whole process group: DataLoader workers ignore these signals
(`dcae_train.data.webdataset.ignore_preemption_signals`) and stop when the main process ends the epoch. Under
SLURM too these handlers own SIGUSR1 (the trainer turns Lightning's own auto-requeue off), so there is one
preemption path everywhere (docs/troubleshooting.md, docs/training.md).

Fault injection, for the chaos tests only: `DCAE_TRAIN_FAULTS="nan@3,nan@3,sigterm@5,kill@6"` makes the loss of
the next two batches at step 3 NaN (each entry fires once; a skipped batch does not advance the step), sends
SIGTERM to the process at step 5, and SIGKILLs it after step 6 (`killwrite@N`: half-way through the next
checkpoint write instead). `sigint@N` sends one SIGINT per entry; `sigterm@0` fires when the start-up
validation begins. Unset in normal runs: the callback is not even installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch

EXIT_PREEMPTED = 75
FAULTS_ENV = "DCAE_TRAIN_FAULTS"


class Preempted(Exception):
    """Raised to end a stand-alone validation (the start-up pass) on a preemption signal."""


class PreemptionSignals:
    """Process-wide record of the preemption signal received; one instance, `SIGNALS`."""

    NAMES = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self) -> None:
        self.requested: str | None = None
        self.interrupts = 0

    def reset(self) -> None:
        self.requested, self.interrupts = None, 0

    def handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            self.interrupts += 1
            if self.interrupts > 1:
                raise KeyboardInterrupt  # the second Ctrl-C: abort now, no checkpoint
            # os.write, not print: a handler may run in the middle of another write to stderr
            os.write(
                2,
                b"\ninterrupted: saving a checkpoint at the next step, then exiting with 75 (resume=auto "
                b"continues); press Ctrl-C again to abort without one\n",
            )
        self.requested = self.requested or name

    def install(self) -> dict[int, Any]:
        """Point the signals at `handler`; returns the handlers replaced (main thread only, else nothing)."""
        previous: dict[int, Any] = {}
        for name in self.NAMES:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                previous[sig] = signal.signal(sig, self.handler)
        return previous


SIGNALS = PreemptionSignals()


@contextlib.contextmanager
def preemption_signals() -> Iterator[PreemptionSignals]:
    """Catch preemption signals from here on (the CLI's whole run); the previous handlers come back after."""
    SIGNALS.reset()
    previous = SIGNALS.install()
    try:
        yield SIGNALS
    finally:
        _restore(previous)


def _restore(previous: dict[int, Any]) -> None:
    for sig, prev in previous.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(sig, prev)
    previous.clear()


class Preemption(L.Callback):
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.preempted = False  # set on every rank once any rank was signalled: the run stopped to be resumed
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> str | None:
        """The signal this process received (SIGTERM, SIGUSR1, SIGINT), or None."""
        return SIGNALS.requested

    def _take_signals(self) -> None:
        # Lightning installs its own SIGTERM handler when fit/validate starts; ours replace it, so ours decide.
        previous = SIGNALS.install()
        for sig, prev in previous.items():
            self._previous.setdefault(sig, prev)

    def on_train_start(self, trainer, pl_module) -> None:
        self._take_signals()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._take_signals()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.requested and not trainer.training and trainer.state.fn == "validate":
            raise Preempted(f"preempted by {self.requested} during the start-up validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            _restore(self._previous)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        requested = self._broadcast(trainer)
        if not requested:
            return
        ckpt = self.run_dir / "checkpoints" / f"preempt-step{trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(ckpt, weights_only=False)
        last = self.run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)
        # Else ModelCheckpoint rewrites last.ckpt as the stopped fit ends, with the epoch marked complete: the
        # resumed run would then skip the rest of that epoch's batches. (Private attributes of Lightning 2.x.)
        for callback in trainer.checkpoint_callbacks:
            callback._last_global_step_saved = trainer.global_step
            callback._last_checkpoint_saved = str(last)
        trainer.should_stop = True
        self.preempted = True  # read by FinishedMarker and by the CLI for the exit code
        pl_module.print(f"preempted by {self.requested or 'a signal on another rank'}: saved {ckpt}; exiting")

    def _broadcast(self, trainer) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce(flag, reduce_op="max")
        return bool(flag.item())

    def on_train_end(self, trainer, pl_module) -> None:
        _restore(self._previous)

    def on_exception(self, trainer, pl_module, exception) -> None:
        _restore(self._previous)


def parse_faults(spec: str | None) -> dict[int, list[str]]:
    faults: dict[int, list[str]] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        kind, _, step = item.partition("@")
        if kind not in ("nan", "kill", "killwrite", "sigterm", "sigint") or not step.isdigit():
            raise ValueError(f"{FAULTS_ENV}: bad entry {item!r}; use nan@N, kill@N, killwrite@N, sigterm@N or sigint@N")
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
        _send_signals(kinds)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.state.fn == "validate" and batch_idx == 0:  # the start-up validation
            _send_signals(self.faults.get(0, []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        kinds = self.faults.get(trainer.global_step, [])
        if "kill" in kinds:
            os.kill(os.getpid(), signal.SIGKILL)
        if "killwrite" in kinds:
            _kill_during_next_save()


def _send_signals(kinds: list[str]) -> None:
    if "sigterm" in kinds:
        os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(kinds.count("sigint")):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs before os.kill returns: two entries = two Ctrl-C


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
