"""wandb: online when an API key is configured, offline otherwise, disabled on request (and in tests).

The mode is decided before the Trainer is built and exported as WANDB_MODE, so DDP children inherit it and
no process ever blocks on a login prompt. The run id is kept in `<run_dir>/wandb_id.txt` (written by global rank
0 only, with the run config: the other ranks' loggers never start a run), so `resume=` continues the same wandb
run. Offline runs are uploaded later with `wandb sync <run_dir>/wandb/offline-run-*`.
"""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger

from dcae_train.data.shards import write_atomic
from dcae_train.training.config import WandbConfig

WANDB_ID_FILE = "wandb_id.txt"


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    env = os.environ.get("WANDB_MODE")
    if env in ("disabled", "offline", "dryrun"):  # the environment wins: tests and CI set disabled
        return "offline" if env == "dryrun" else env
    if mode == "auto":
        return "online" if has_api_key() else "offline"
    if mode == "online" and not has_api_key():
        raise ValueError(
            "logger.wandb.mode=online but no wandb API key is configured: run `wandb login` or set WANDB_API_KEY, "
            "or use logger.wandb.mode=offline (sync later with `wandb sync`)"
        )
    return mode


def wandb_run_id(run_dir: Path) -> str:
    """The run's wandb id: the one in `wandb_id.txt` (a resumed run), else a new one."""
    id_file = run_dir / WANDB_ID_FILE
    return id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)


def save_wandb_id(run_dir: Path, run_id: str) -> None:
    write_atomic(run_dir / WANDB_ID_FILE, run_id.encode())


def build_wandb_logger(w: WandbConfig, run_dir: Path, recipe: str, phase: int, run_id: str) -> WandbLogger | None:
    mode = resolve_mode(w.mode)
    os.environ["WANDB_MODE"] = mode
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return WandbLogger(
        project=w.project,
        entity=w.entity,
        name=w.name or f"{recipe}-p{phase}-{run_dir.name}",
        id=run_id,
        save_dir=str(run_dir),
        tags=list(w.tags) + [recipe, f"phase{phase}"],
        resume="allow",
        log_model=False,
    )
