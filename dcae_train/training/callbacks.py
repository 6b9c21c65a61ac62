"""Files a person can open without an account: reconstruction grids (PNG), loss curves, the run marker; and
the training stream's position, which checkpoints record for an exact mid-epoch resume.

The metrics CSV is Lightning's CSVLogger writing `<run_dir>/metrics.csv`, except that a resumed run appends
to it (`AppendingCSVLogger`; Lightning deletes it) after dropping the rows logged after the resumed
checkpoint, so the file and `loss_curves.png` cover the whole run once.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from dcae_train.evaluation.metrics import to_uint8
from dcae_train.training.checkpoint import write_finished
from dcae_train.training.faults import Preemption

log = logging.getLogger(__name__)


def reconstruction_grid(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) pairs -> one uint8 (3, B*H, 3*W) image: input | reconstruction | error map (x4)."""
    err = (x_hat.float() - x.float()).abs().mean(dim=1, keepdim=True).mul(4).clamp(0, 2) - 1  # [-1, 1]
    rows = torch.cat([x.float(), x_hat.float().clamp(-1, 1), err.expand_as(x)], dim=3)  # (B, 3, H, 3W)
    return to_uint8(torch.cat(list(rows), dim=1))  # (3, B*H, 3W)


def save_png(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(path)


class ReconstructionGrids(L.Callback):
    """Every `every` steps (and at the end): a fixed set of validation images, reconstructed by the raw and
    EMA weights, saved as PNG under `<run_dir>/images/` and logged to wandb as uint8 images."""

    def __init__(self, run_dir: Path, every: int, num_images: int = 4) -> None:
        self.dir = Path(run_dir) / "images"
        self.every = max(int(every), 1)
        self.num_images = num_images
        self._fixed: torch.Tensor | None = None

    def _images(self, trainer: L.Trainer) -> torch.Tensor | None:
        if self._fixed is None:
            loader = trainer.datamodule.val_dataloader()
            batch = next(iter(loader), None)
            if batch is None:
                return None
            self._fixed = batch["image"][: self.num_images]
        return self._fixed

    @rank_zero_only
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> None:
        x = self._images(trainer)
        if x is None:
            return
        x = x.to(pl_module.device)
        step = trainer.global_step
        for name, model in (("raw", pl_module.model), ("ema", pl_module.ema)):
            if model is None:
                continue
            was_training = model.training
            model.eval()
            with torch.no_grad():
                x_hat = model(x)
            model.train(was_training)
            if name == "raw":
                pl_module.train(pl_module.training)  # re-apply frozen-norm eval after model.train()
            grid = reconstruction_grid(x, x_hat)
            save_png(grid, self.dir / f"{tag}_step{step:08d}_{name}.png")
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    logger.log_image(key=f"images/{name}", images=[grid.permute(1, 2, 0).cpu().numpy()], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self.write(trainer, pl_module, "recon")

    def on_train_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module, "final")


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Lightning deletes an existing metrics.csv here. Keep it, and its header, so new rows are appended.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that appends to an existing metrics.csv (a resumed run) instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def drop_rows_after(csv_path: Path, step: int) -> None:
    """Remove the rows logged after `step` (by a run killed after its last checkpoint): resumed, it logs them again."""
    if not csv_path.is_file():
        return
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    keep = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
    if len(keep) == len(rows):
        return
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    tmp.replace(csv_path)


class DataPosition(L.Callback):
    """Tells the datamodule which batch of the epoch is being trained on, so checkpoints store the position."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        note = getattr(trainer.datamodule, "note_batch", None)
        if note is not None:
            note(trainer.current_epoch, batch_idx)


class LossCurves(L.Callback):
    """At the end of fit: `<run_dir>/loss_curves.png` from the metrics CSV."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._resumed = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._resumed = bool(trainer.ckpt_path)

    @rank_zero_only
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._resumed:  # the rows from after the resumed checkpoint are logged again from here on
            self._resumed = False
            # Training rows carry the update's index (module._emit): the resumed run logs N, N+1, ... again
            drop_rows_after(self.run_dir / "metrics.csv", trainer.global_step)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        for logger in trainer.loggers:
            logger.save()
        metrics = self.run_dir / "metrics.csv"
        if metrics.is_file():
            plot_metrics(metrics, self.run_dir / "loss_curves.png")


def plot_metrics(csv_path: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key, value in row.items():
                if not value or key == "step" or not key.startswith(("train/loss", "val/loss", "val_ema/loss")):
                    continue
                try:
                    series.setdefault(key, []).append((float(step), float(value)))
                except (TypeError, ValueError):
                    continue
    if not series:
        return
    keys = sorted(series)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        xs, ys = zip(*sorted(series[key]), strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class FinishedMarker(L.Callback):
    """Writes FINISHED.json (the final checkpoint's path) once fit completes, so the next phase can find it."""

    def __init__(self, run_dir: Path, info: dict[str, Any], preemption: Preemption) -> None:
        self.run_dir = Path(run_dir)
        self.info = info
        self.preemption = preemption
        self.finished = False

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.interrupted or self.preemption.preempted:
            return  # not finished: a preempted run continues with resume=auto
        self._finish(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        """Lightning skips the fit loop, and `on_train_end` with it, when the resumed checkpoint is already at
        max_steps (a run killed after its last step's checkpoint, before final.ckpt); `on_fit_end` still runs
        (after the strategy's teardown, on every rank): the run is finished here instead, so the next phase
        finds it."""
        if not self.finished and not trainer.interrupted and not self.preemption.preempted and trainer.fit_loop.done:
            self._finish(trainer)

    def _finish(self, trainer) -> None:
        final = self.run_dir / "checkpoints" / "final.ckpt"
        trainer.save_checkpoint(final, weights_only=False)  # collective under DDP: every rank calls it
        if trainer.is_global_zero:
            write_finished(self.run_dir, final, {**self.info, "step": trainer.global_step})
        self.finished = True
