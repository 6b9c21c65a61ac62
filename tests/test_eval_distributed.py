"""Two gloo ranks, each evaluating half the images, report exactly what one process reports on all of them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcae_train.evaluation.evaluator import ReconstructionEvaluator
from dcae_train.evaluation.extractors import TinyFeatures


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32, generator=gen) * 2 - 1
    x_hat = (x + 0.2 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    z = torch.randn(8, 4, 4, 4, generator=gen)
    return x, x_hat, z


def _evaluate(x, x_hat, z, keys):
    ev = ReconstructionEvaluator(None, TinyFeatures(dim=8), worst_k=3)
    ev.update(x, x_hat, z, keys)
    out = ev.compute()
    out["worst"] = [w["key"] for w in ev.worst()]
    return out


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, x_hat, z = _data()
    sl = slice(rank * 4, rank * 4 + 4)
    out = _evaluate(x[sl], x_hat[sl], z[sl], [str(i) for i in range(8)][sl])
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    x, x_hat, z = _data()
    single = _evaluate(x, x_hat, z, [str(i) for i in range(8)])
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    merged = queue.get(timeout=120)
    for p in procs:
        p.join(timeout=60)
    assert merged["num_images"] == 8
    for key in ("psnr", "ssim", "rfid"):
        assert abs(merged[key] - single[key]) < 1e-9, key
    assert abs(merged["latent"]["rms"] - single["latent"]["rms"]) < 1e-12
    assert merged["worst"] == single["worst"]
