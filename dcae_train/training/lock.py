"""One writer per run folder: an exclusive lock on `<run_dir>/.lock`, held for the life of the process.

Without it, `resume=auto` attaches to a run that is still alive and both processes write the same checkpoints
and `metrics.csv`. The lock is `flock(2)`: the kernel releases it when the holder dies, however it dies, so a
lock left by a killed process is never an obstacle. The file also records who holds it (pid, host, start
time); it is emptied on a clean exit, so a non-empty file we can lock is a stale lock, taken over with a warning.

Hand-written rather than `filelock.FileLock` (which also uses flock): we need the holder's identity in the
refusal message and the stale-holder warning, which filelock does not expose.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from dcae_train.schema import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # resolved run folder -> open descriptor holding its lock (this process)


class RunLockedError(ValueError):
    """Another live process writes this run folder (the CLI exits with code 2)."""


def is_global_rank_zero() -> bool:
    """From the launcher's environment (torchrun, SLURM, Lightning's relaunch); before any process group exists."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return int(rank) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def lock_run_dir(run_dir: Path, source: tuple[str, str] | None = None) -> None:
    """Create the run folder and take its lock for this process; RunLockedError names a live holder, and a
    folder that cannot be created or written is a ConfigError on `source` ((key, value): runs_dir or run_dir)."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        return  # this process already writes here (e.g. a test that builds the same run twice)
    try:
        Path(key).mkdir(parents=True, exist_ok=True)
        fd = os.open(Path(key) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        rule = f"cannot create or write the run folder {key} ({err.strerror}); pick a writable folder"
        name, value = source or ("run_dir", str(run_dir))
        raise ConfigError(name, value, rule, "runs") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(_read(fd))
        os.close(fd)
        raise RunLockedError(
            f"run folder {key} is in use by another process ({holder}): two writers would garble its checkpoints "
            f"and metrics.csv. Wait for that run to end or stop it, or start a new run (no resume=, no run_dir=)"
        ) from None
    previous = _read(fd)
    if previous:
        log.warning("run folder %s: taking over the stale lock of %s, which is no longer running", key,
                    _describe(previous))  # fmt: skip
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _held[key] = fd
    atexit.register(_release, key)


def _read(fd: int) -> dict:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return {}
    try:
        return json.loads(data)
    except ValueError:
        return {"pid": "?", "host": "?", "since": "?"}  # an unreadable record still means a stale lock


def _describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('since')}"


def _release(key: str) -> None:
    fd = _held.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)  # a clean exit leaves an empty file: no stale-lock warning next time
        os.close(fd)
