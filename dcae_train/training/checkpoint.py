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
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)

FINISHED = "FINISHED.json"
_STEP_RE = re.compile(r"step(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temporary file + fsync + os.replace; weights-only loading."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, Path(path))

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        return safe_load(path, map_location=map_location or "cpu")


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


def safe_load(path: _PATH, map_location: Any = "cpu") -> Any:
    """Load a checkpoint without unpickling arbitrary objects; a clear error for anything else."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... by case
        raise RuntimeError(
            f"cannot load checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "It is truncated, corrupt, or holds objects that are refused for safety (weights_only=True)."
        ) from err


def check_resumable(path: Path) -> None:
    """Unpickle (weights only, tensors memory-mapped, so cheap) and check it is one of our training checkpoints."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise ValueError(
            f"resume={path}: refused: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
            "(checkpoints are loaded with weights_only=True; this one is corrupt or holds arbitrary objects)"
        ) from err
    missing = [k for k in ("state_dict", "global_step", "dcae") if k not in ckpt]
    if missing:
        raise ValueError(
            f"resume={path}: not a dcae-train training checkpoint (missing {missing}); "
            "to start from weights only use init_from= instead"
        )


def is_loadable(path: Path) -> bool:
    """Cheap integrity check: a complete zip (torch's format) whose members pass their CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def checkpoint_step(path: Path) -> int:
    m = _STEP_RE.search(path.stem)
    return int(m.group(1)) if m else -1


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


def find_resume_checkpoint(runs_dir: str | Path, recipe: str, phase: int) -> Path:
    runs = runs_newest_first(runs_dir, recipe, phase)
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
