"""Counting skipped non-finite steps, and stopping the run after too many in a row.

Unfused optimizers are checked on the host, every step. Fused AdamW (the CUDA default) skips a non-finite step
inside its kernel; the counts then stay on the device and are read only every `flush_every` steps and when a
checkpoint is saved, so a step never waits for the host. A step skipped on the device still counts in
global_step (its batch is consumed; weights and moments are unchanged).
"""

from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row: the run stops (exit code 3); checkpoints written before are kept."""


_FIX = "Lower the learning rate or enable optimizer.grad_clip."  # the CLI adds which checkpoint, if any, is kept


class NonFiniteGuard:
    def __init__(self, limit: int, flush_every: int) -> None:
        self.limit, self.flush_every = limit, max(1, flush_every)
        self.in_a_row = 0
        self.total = 0
        self._run: torch.Tensor | None = None  # device-side: consecutive non-finite steps, 0 after a good one
        self._new: torch.Tensor | None = None  # device-side: non-finite steps since the last flush

    def reset(self) -> None:
        self.in_a_row = 0

    def on_host(self, step: int, detail: str) -> str:
        """A non-finite step seen on the host: the warning to print; raises after `limit` in a row."""
        self.in_a_row += 1
        self.total += 1
        msg = f"non-finite loss or gradient at step {step} ({detail})"
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{msg}: {self.in_a_row} non-finite steps in a row (trainer.max_nonfinite_steps={self.limit}); "
                f"stopping. {_FIX}"
            )
        return f"{msg}; step skipped ({self.in_a_row} in a row)"

    def on_device(self, ok: torch.Tensor, step: int) -> str | None:
        """Count on the device; every `flush_every` steps read the counts (see `flush`)."""
        bad = (~ok).to(torch.int64)
        if self._run is None or self._new is None:
            self._run, self._new = torch.zeros_like(bad), torch.zeros_like(bad)
        self._run = (self._run + 1) * bad
        self._new += bad
        return self.flush(step) if (step + 1) % self.flush_every == 0 else None

    def flush(self, step: int) -> str | None:
        """Read the device counts: a warning when steps were skipped since the last read; raises after too many."""
        if self._run is None or self._new is None:
            return None
        new, run = int(self._new.item()), int(self._run.item())
        self._new.zero_()
        if not new:
            return None
        self.total += new
        msg = f"{new} non-finite loss/gradient step(s) skipped on the device up to step {step} ({run} in a row now)"
        if run >= self.limit:
            raise NonFiniteLossError(f"{msg}: >= trainer.max_nonfinite_steps={self.limit} in a row; stopping. {_FIX}")
        return msg
