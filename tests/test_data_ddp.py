"""Two-process DDP (gloo, CPU) over uneven shards: disjoint shards per rank, equal batch counts, no hang."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from _helpers_data import clean_shards

SIZES = [3, 11, 2, 9, 5, 1, 7, 4]  # uneven on purpose: rank 0 holds 3+2+5+7=17 samples, rank 1 holds 25
EPOCH_BATCHES, BATCH = 7, 3  # 21 samples per rank per epoch: more than rank 0 holds, fewer than rank 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, urls: list[str], cache: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DCAE_TRAIN_CACHE=cache)
    torch.set_num_threads(1)
    # A short timeout turns a hang (one rank waiting in a collective for a rank that ran dry) into a failure.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    from dcae_train.data import DataConfig
    from dcae_train.training.datamodule import ImageDataModule

    cfg = DataConfig(
        train=urls, val=urls, num_workers=2, val_num_workers=2, epoch_batches=EPOCH_BATCHES, shuffle_buffer=8
    )
    dm = ImageDataModule(cfg, resolution=32, batch_size=BATCH, seed=5)
    dm.setup("fit")  # no trainer: rank and world size come from torch.distributed
    result: dict = {"epochs": []}
    for _epoch in range(2):  # the loader counts its own epochs (no trainer): new seeds each time
        urls_seen, batches = set(), 0
        for batch in dm.train_dataloader():
            assert batch["image"].shape == (BATCH, 3, 32, 32)
            urls_seen.update(batch["url"])
            batches += 1
            dist.all_reduce(torch.ones(1))  # a per-step collective, as DDP's gradient all-reduce
        result["epochs"].append({"batches": batches, "urls": sorted(urls_seen)})
    result["val_keys"] = [k for b in dm.val_dataloader() for k in b["key"]]
    dist.barrier()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_ddp_disjoint_shards_equal_batches_no_hang(tmp_path):
    urls = clean_shards(tmp_path / "shards", SIZES, w=40, h=36)
    tmp.spawn(_rank_main, args=(2, _free_port(), urls, str(tmp_path / "cache"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for e0, e1 in zip(r0["epochs"], r1["epochs"], strict=True):
        assert e0["batches"] == e1["batches"] == EPOCH_BATCHES
        assert not set(e0["urls"]) & set(e1["urls"]), "ranks read the same shard within an epoch"
    # The split is redrawn each epoch (same permutation on every rank), so a rank does not see half the data forever.
    assert r0["epochs"][0]["urls"] != r0["epochs"][1]["urls"]
    # Validation: every sample exactly once over the two ranks (batch b on rank b % 2).
    assert sorted(r0["val_keys"] + r1["val_keys"]) == sorted(f"s{i}_{j}" for i, n in enumerate(SIZES) for j in range(n))
