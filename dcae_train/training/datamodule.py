"""ImageDataModule: the training loop's view of the data (demo or WebDataset shards).

Batches are dicts:
  image    float32 (B, 3, R, R) in [-1, 1]
  key      list[str]  sample keys;  url: list[str]  the shard each sample came from
  skipped  int64 scalar: the producing worker's cumulative count of skipped (bad or too-small) samples
  worker   int64 scalar: the producing worker's index
`skipped_samples()` sums the latest count of every worker seen on this rank (train + val, all epochs so far).
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from dcae_train.data.config import DataConfig
from dcae_train.data.demo import demo_shards
from dcae_train.data.specs import is_demo, sources_from_spec
from dcae_train.data.transforms import TransformSpec
from dcae_train.data.webdataset import StreamLoader, TrainStream, ValStream


def _rank_and_world() -> tuple[int, int]:
    """Without a trainer: torch.distributed if it is up, else torchrun/SLURM-style env vars, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class ImageDataModule(L.LightningDataModule):
    """Training: endless shuffled crops, `config.epoch_batches` batches per rank per epoch.
    Validation: the same centre crops in the same order on every run, worker count and world size."""

    def __init__(
        self,
        config: DataConfig,
        *,
        resolution: int,
        batch_size: int,
        seed: int = 0,
        val_resolution: int | None = None,
        val_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self.config, self.seed = config, int(seed)
        self.resolution, self.batch_size = int(resolution), int(batch_size)
        self.val_resolution = int(val_resolution or resolution)
        self.val_batch_size = int(val_batch_size or batch_size)
        self._train: StreamLoader | None = None
        self._val: StreamLoader | None = None
        self._specs: dict[str, Any] | None = None
        # Where the training stream stands: (epoch, batches of it trained on); saved in every checkpoint.
        self.position: tuple[int, int] = (0, 0)
        self._resume_at: tuple[int, int] | None = None  # from a checkpoint, used by the next epoch's iterator

    # Specs ----------------------------------------------------------------------------------------
    def _uses_demo(self) -> bool:
        return is_demo(self.config.train) or self.config.val == "demo" or self.config.val is None

    def prepare_data(self) -> None:
        """Lightning calls this on one process per node: build the demo shards there first."""
        if self._uses_demo():
            demo_shards()

    def _resolved(self) -> dict[str, Any]:
        if self._specs is None:
            demo = None
            if self._uses_demo():
                demo = demo_shards()  # race-safe if prepare_data did not run (e.g. no trainer)
            train = demo["train"] if is_demo(self.config.train) else self.config.train
            val = demo["val"] if (self.config.val == "demo" or self.config.val is None) else self.config.val
            self._specs = {
                "train": sources_from_spec(train, "data.train"),
                "val": [u for s in sources_from_spec(val, "data.val") for u in s.urls],  # listed order
            }
        return self._specs

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return _rank_and_world()

    def setup(self, stage: str | None = None) -> None:
        self._resolved()  # fail on a bad path now, not in a worker

    # Loaders --------------------------------------------------------------------------------------
    def _spec(self, train: bool) -> TransformSpec:
        c = self.config
        return TransformSpec(
            resolution=self.resolution if train else self.val_resolution,
            crop=c.crop if train else "center",
            flip=c.flip and train,
            small_images=c.small_images,
            crop_scale=(c.crop_scale[0], c.crop_scale[1]),
            fast_decode=c.fast_decode,
            max_pixels=c.max_pixels,
            max_aspect=c.max_aspect,
        )

    def _epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    def train_dataloader(self) -> StreamLoader:
        if self._train is None:
            rank, world = self._rank_world()
            stream = TrainStream(
                self._resolved()["train"],
                self._spec(train=True),
                batch_size=self.batch_size,
                seed=self.seed,
                rank=rank,
                world_size=world,
                shuffle_buffer=self.config.shuffle_buffer,
                warn_every_s=self.config.warn_every_s,
            )
            has_trainer = self.trainer is not None
            self._train = StreamLoader(
                stream,
                num_workers=self.config.num_workers,
                length=self.config.epoch_batches,
                prefetch_factor=self.config.prefetch_factor,
                pin_memory=torch.cuda.is_available(),
                epoch_fn=self._epoch if has_trainer else None,
                skip_fn=self._batches_to_skip,
            )
        return self._train

    def val_dataloader(self) -> StreamLoader:
        if self._val is None:
            rank, world = self._rank_world()
            stream = ValStream(
                self._resolved()["val"],
                self._spec(train=False),
                batch_size=self.val_batch_size,
                rank=rank,
                world_size=world,
                max_samples=self.config.val_samples,
                warn_every_s=self.config.warn_every_s,
            )
            workers = self.config.num_workers if self.config.val_num_workers is None else self.config.val_num_workers
            self._val = StreamLoader(
                stream, num_workers=workers, prefetch_factor=self.config.prefetch_factor, pin_memory=False
            )
        return self._val

    # Stream position (exact mid-epoch resume) -----------------------------------------------------------
    def note_batch(self, epoch: int, batch_idx: int) -> None:
        """Called as each training batch starts: once it is done, `batch_idx + 1` batches of `epoch` are used
        (checkpoints are written after a batch, so this is the position they must record)."""
        self.position = (int(epoch), int(batch_idx) + 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.position[0], "batches": self.position[1]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def _batches_to_skip(self, epoch: int) -> int:
        resume, self._resume_at = self._resume_at, None  # once: later epochs start from their beginning
        return resume[1] if resume is not None and resume[0] == epoch else 0

    # Counters -------------------------------------------------------------------------------------
    def skipped_samples(self) -> int:
        """Samples skipped on this rank so far (bad bytes, missing image, bomb/absurd size, too small)."""
        return sum(loader.skipped for loader in (self._train, self._val) if loader is not None)
