"""Checkpoints that survive crashes, and finding the right one to resume or start a phase from.

- Every checkpoint is written atomically: to a temporary file in the same folder, fsync'd, then renamed
  over the target, so a crash mid-write leaves the previous file intact (`last.ckpt` included).
- Loading always uses `torch.load(weights_only=True)`: a checkpoint cannot run code.
- `resume=auto` takes the checkpoint with the highest *stored* step (never file times: `cp -r`, rsync without
  `-t` or `touch` change those) of the most recent run of the same recipe and phase; a truncated or corrupt
  file, or one that is not a dcae-train training checkpoint, is skipped with a warning.
- Temporary files of writes that were killed half-way are removed when a run (re)starts in its folder.
- Phase N > 1 starts from the final checkpoint of the latest *finished* run of phase N-1 (the run folder
  holds a `FINISHED.json` written after its last checkpoint, naming it relative to the run folder, so runs
  folders can be moved or copied).
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
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the mode of any other file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc); elsewhere set-and-restore."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / file system
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_resumable(path: Path) -> int:
    """One of our training checkpoints: its step (tensors memory-mapped, so cheap); ValueError otherwise."""
    try:
        ckpt, _ = read_training_checkpoint(path, mmap=True)
    except ValueError as err:
        raise ValueError(f"resume={path}: refused: {err}; to start from weights only use init_from= instead") from err
    if "global_step" not in ckpt:
        raise ValueError(f"resume={path}: not a dcae-train training checkpoint (no global_step); use init_from=")
    return int(ckpt["global_step"])


def stored_step(path: Path) -> int | None:
    """The step a dcae-train training checkpoint holds; None for anything else (tensors are not read)."""
    try:
        return check_resumable(path)
    except ValueError:
        return None


def is_loadable(path: Path) -> bool:
    """Cheap integrity check: a complete zip (torch's format) whose members pass their CRC."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def checkpoints_newest_first(run_dir: Path) -> list[tuple[int, Path]]:
    """(stored step, path) of the run's training checkpoints, highest step first; other files skipped, warned."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(p for p in folder.glob("*.ckpt") if not p.name.startswith(".")):
        step = stored_step(path)
        if step is None:
            log.warning("%s is not a readable dcae-train training checkpoint; skipped", path)
        else:
            found.append((step, path))
    # Same step: last.ckpt first (the file the trainer keeps writing); the rest by name, for a stable choice.
    return sorted(found, key=lambda sp: (-sp[0], sp[1].name != "last.ckpt", sp[1].name))


def latest_good_checkpoint(run_dir: Path) -> Path | None:
    for _, path in checkpoints_newest_first(run_dir):
        if is_loadable(path):  # the stored step was read from the pickle only: check every member's CRC
            return path
        log.warning("checkpoint %s is truncated or corrupt; falling back to an earlier one", path)
    return None


def remove_orphaned_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of checkpoint (and marker) writes that were killed before their rename.
    Only while holding the run folder's lock: a live writer's temporary file would look the same."""
    folder = run_dir / "checkpoints"
    orphans = [*folder.glob(".*.tmp"), *run_dir.glob(f".{FINISHED}.tmp")]  # nothing when a folder is missing
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        log.warning("removed %d temporary file(s) left by interrupted writes in %s", len(orphans), run_dir)


def phase_root(runs_dir: str | Path, recipe: str, phase: int) -> Path:
    return Path(runs_dir) / recipe / f"phase{phase}"


def runs_newest_first(runs_dir: str | Path, recipe: str, phase: int) -> list[Path]:
    root = phase_root(runs_dir, recipe, phase)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True)


def find_resume_checkpoint(runs_dir: str | Path, recipe: str, phase: int, prefer: Path | None = None) -> Path:
    """The checkpoint `resume=auto` continues (see `resume_target`); `prefer`: this launch's own run folder."""
    run, ckpt = resume_target(runs_dir, recipe, phase, prefer)
    if ckpt is None:
        raise FileNotFoundError(f"resume=auto: the newest run {run} has no checkpoint yet")
    return ckpt


def resume_target(
    runs_dir: str | Path, recipe: str, phase: int, run_dir: str | Path | None = None
) -> tuple[Path, Path | None]:
    """What `resume=auto` continues: the newest run folder of the recipe and phase (or `run_dir`), from its best
    checkpoint, or from step 0 when it has none yet (stopped before its first one). Never an older run: that
    one may be finished, and its final.ckpt the parent of later phases. `run_dir`: the launch's own folder (run_dir=,
    or the torchrun / SLURM job's `job-<id>`), so every rank of a relaunched job continues the same run."""
    if run_dir is None:
        runs = runs_newest_first(runs_dir, recipe, phase)
        if not runs:
            raise FileNotFoundError(
                f"resume=auto: no run of recipe {recipe!r} phase {phase} under {phase_root(runs_dir, recipe, phase)}. "
                f"Start a new run without resume, or pass resume=<path/to/checkpoint.ckpt>."
            )
        run = runs[0]
    else:
        run = Path(run_dir)
    ckpt = latest_good_checkpoint(run)
    if ckpt is None and any((run / "checkpoints").glob("[!.]*.ckpt")):
        raise ValueError(
            f"resume=auto: no checkpoint in {run / 'checkpoints'} is readable (see the warnings above); "
            f"pass resume=<path/to/checkpoint.ckpt> of an earlier run, or start a new run without resume"
        )
    if ckpt is None:
        log.warning("resume=auto: %s has no checkpoint yet (it stopped before its first one): starting it from step 0",
                    run)  # fmt: skip
    return run, ckpt


def check_same_run(path: Path, recipe: str, phase: int, variant: str, trainable: list[str]) -> None:
    """Refuse to resume a checkpoint of another recipe, phase, variant or trainable set (ValueError naming it)."""
    _, meta = read_training_checkpoint(path, mmap=True)
    mismatches = [
        (key, got, want)
        for key, got, want in (
            ("recipe", meta.recipe, recipe),
            ("phase", meta.phase, phase),
            ("model.variant", meta.variant, variant),
            (f"phases.p{phase}.trainable", meta.trainable, trainable),
        )
        if got is not None and got != want
    ]
    if mismatches:
        what = "; ".join(f"{key}={got} in the checkpoint, {want} in this run" for key, got, want in mismatches)
        raise ValueError(
            f"resume={path}: a checkpoint of another run ({what}). Resume it with the same settings, or use "
            f"init_from={path} to start this run from its weights"
        )


def find_parent_checkpoint(runs_dir: str | Path, recipe: str, phase: int) -> Path:
    """The final checkpoint of the latest finished run of phase-1."""
    parent_phase = phase - 1
    for run in runs_newest_first(runs_dir, recipe, parent_phase):
        marker = run / FINISHED
        if not marker.is_file():
            continue
        ckpt = _finished_checkpoint(run, json.loads(marker.read_text())["checkpoint"])
        if ckpt.is_file() and is_loadable(ckpt):
            return ckpt
        log.warning("finished run %s names a missing or corrupt checkpoint %s; trying an older run", run, ckpt)
    raise FileNotFoundError(
        f"phase={phase} starts from the weights of phase {parent_phase}, but no finished phase-{parent_phase} run of "
        f"recipe {recipe!r} was found under {phase_root(runs_dir, recipe, parent_phase)}. Run "
        f"`python -m dcae_train recipe={recipe} phase={parent_phase}` first, or pass init_from=<checkpoint | "
        f"diffusers dir | original .safetensors | HF repo id>."
    )


def _finished_checkpoint(run: Path, stored: str) -> Path:
    """The marker's checkpoint in *this* copy of the run: relative paths (ours) are relative to the run folder;
    an absolute one (older markers) is used only when the run folder holds no file of that name."""
    path = Path(stored)
    if not path.is_absolute():
        return run / path
    own = run / "checkpoints" / path.name
    return own if own.is_file() else path


def write_finished(run_dir: Path, checkpoint: Path, info: dict[str, Any]) -> None:
    # Relative to the run folder, so a moved or copied runs folder keeps chaining phases to its own files.
    payload = {"checkpoint": os.path.relpath(checkpoint.resolve(), Path(run_dir).resolve()), **info}
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
