"""Checkpoints that survive crashes, and finding the right one to resume or start a phase from.

- Every checkpoint is written atomically: to a temporary file in the same folder, fsync'd, then renamed
  over the target, so a crash mid-write leaves the previous file intact (`last.ckpt` included).
- Loading always uses `torch.load(weights_only=True)`: a checkpoint cannot run code.
- `resume=auto` takes the newest *loadable* checkpoint of the most recent run of the same recipe and phase;
  a truncated or corrupt newest file is skipped with a warning.
- Phase N > 1 starts from the final checkpoint of the latest *finished* run of phase N-1 (the run folder
  holds a `FINISHED.json` written after its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dcae_train.weights.checkpoint import load_checkpoint, read_training_checkpoint

log = logging.getLogger(__name__)

FINISHED = "FINISHED.json"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file + fsync + os.replace; weights-only loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return load_checkpoint(path, map_location=map_location or "cpu")


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resumable(path: Path) -> None:
    """One of our training checkpoints, with its step (tensors memory-mapped, so cheap); ValueError otherwise."""
    try:
        ckpt, _ = read_training_checkpoint(path, mmap=True)
    except ValueError as err:
        raise ValueError(f"resume={path}: refused: {err}; to start from weights only use init_from= instead") from err
    if "global_step" not in ckpt:
        raise ValueError(f"resume={path}: not a dcae-train training checkpoint (no global_step); use init_from=")


def is_loadable(path: Path) -> bool:
    """Cheap integrity check: a complete zip (torch's format) whose members pass their CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def checkpoints_newest_first(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    files = [p for p in folder.glob("*.ckpt") if not p.name.startswith(".")]
    # last.ckpt is written after the step file of the same step, so it wins ties.
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    for path in checkpoints_newest_first(run_dir):
        if is_loadable(path):
            return path
        log.warning("checkpoint %s is truncated or corrupt; falling back to an earlier one", path)
    return None


def phase_root(runs_dir: str | Path, recipe: str, phase: int) -> Path:
    return Path(runs_dir) / recipe / f"phase{phase}"


def runs_newest_first(runs_dir: str | Path, recipe: str, phase: int) -> list[Path]:
    root = phase_root(runs_dir, recipe, phase)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resume_checkpoint(runs_dir: str | Path, recipe: str, phase: int, prefer: Path | None = None) -> Path:
    """The newest loadable checkpoint of the newest run; the run folder `prefer` (this launch's own: run_dir=, or
    the torchrun / SLURM job's folder) first, so every rank of a relaunched job picks the same file."""
    runs = runs_newest_first(runs_dir, recipe, phase)
    if prefer is not None:
        runs = [prefer, *(r for r in runs if r.resolve() != prefer.resolve())]
    for run in runs:
        ckpt = latest_good_checkpoint(run)
        if ckpt is not None:
            return ckpt
    where = phase_root(runs_dir, recipe, phase)
    raise FileNotFoundError(
        f"resume=auto: no loadable checkpoint under {where} ({len(runs)} run folders). "
        f"Start a new run without resume, or pass resume=<path/to/checkpoint.ckpt>."
    )


def find_parent_checkpoint(runs_dir: str | Path, recipe: str, phase: int) -> Path:
    """The final checkpoint of the latest finished run of phase-1."""
    parent_phase = phase - 1
    for run in runs_newest_first(runs_dir, recipe, parent_phase):
        marker = run / FINISHED
        if not marker.is_file():
            continue
        ckpt = Path(json.loads(marker.read_text())["checkpoint"])
        if not ckpt.is_absolute():
            ckpt = run / ckpt
        if ckpt.is_file() and is_loadable(ckpt):
            return ckpt
        log.warning("finished run %s names a missing or corrupt checkpoint %s; trying an older run", run, ckpt)
    raise FileNotFoundError(
        f"phase={phase} starts from the weights of phase {parent_phase}, but no finished phase-{parent_phase} run of "
        f"recipe {recipe!r} was found under {phase_root(runs_dir, recipe, parent_phase)}. Run "
        f"`python -m dcae_train recipe={recipe} phase={parent_phase}` first, or pass init_from=<checkpoint | "
        f"diffusers dir | original .safetensors | HF repo id>."
    )


def write_finished(run_dir: Path, checkpoint: Path, info: dict[str, Any]) -> None:
    payload = {"checkpoint": str(checkpoint.resolve()), **info}
    tmp = run_dir / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run_dir / FINISHED)


# RNG state, so a resumed run draws the same numbers as an uninterrupted one --------------------------------
def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(py[1]),
        "python_version": py[0],
        "python_gauss": py[2],
        # as tensors and ints: a weights_only load refuses numpy arrays
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype("uint32"), state["numpy"]["pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
