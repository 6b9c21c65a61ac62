"""Shard specs -> per-rank, per-worker sample streams -> batches of decoded crops.

Training (`TrainStream`): each rank takes a disjoint slice of every source's shards (`perm[rank::world]`, with
a permutation shared by all ranks and redrawn every epoch), each worker a disjoint slice of that; a worker
walks its shards in a fresh random order on every pass, forever, so the stream never ends and `StreamLoader`
cuts it to `epoch_batches` per rank: the same count on every rank whatever the shard sizes, so DDP never
waits on a rank that ran dry. Seeds come from (seed, epoch, rank, worker): reproducible from the run seed,
different on every rank and epoch.

Validation (`ValStream`): the first `max_samples` samples of the shards in listed order, cut into global
batches; batch b belongs to rank `b % world` and, inside that rank, to worker `(b // world) % workers`. The
DataLoader visits workers round-robin, so the batches come out in the same order with any worker count, and
the union over ranks is the same set at any world size.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import multiprocessing.util  # noqa: F401  (registers multiprocessing's exit handler first: ours then runs before it)
import os
import random
import re
import signal
import sys
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from dcae_train.data.specs import Source
from dcae_train.data.transforms import BadSample, TransformSpec, decode_and_crop, image_bytes

log = logging.getLogger("dcae_train.data")


# Shard slices -------------------------------------------------------------------------------------


def slice_shards(urls: tuple[str, ...], index: int, count: int) -> tuple[str, ...]:
    """Every `count`-th shard starting at `index`; all of them when there are fewer shards than slices."""
    return urls[index::count] if len(urls) >= count else urls


# Skip counting ---------------------------------------------------------------------------------


class NoUsableDataError(ValueError):
    """The shards yield no usable image (empty, not tar, no image members, every image bad or too small).
    Raised in a DataLoader worker, it reaches the main process with the worker's traceback around the message:
    `message_of` takes our one line back out."""


def message_of(err: BaseException) -> str:
    """Our message from a NoUsableDataError, also when torch re-raised it from a worker with a traceback."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    prefix = f"{NoUsableDataError.__module__}.{NoUsableDataError.__name__}: "
    for head in (prefix, f"{NoUsableDataError.__name__}: "):
        if last.startswith(head):
            return last[len(head) :]
    return last


def _fix_hint(by_reason: Counter[str]) -> str:
    if by_reason.get("too_small"):
        return "set data.small_images=upsample, or train at a lower phases.pN.resolution"
    if by_reason.get("missing_image_key"):
        return "the samples need a jpg, jpeg, png or webp member (see docs/data.md, scripts/make_shards.py)"
    return "check the shards (tar files with jpg/png/webp members; scripts/make_shards.py writes them)"


class SkipCounter:
    """Counts skipped samples by reason in one worker; warns at most once per `warn_every_s` (never sleeps)."""

    def __init__(self, where: str, warn_every_s: float) -> None:
        self.where, self.warn_every_s = where, warn_every_s
        self.by_reason: Counter[str] = Counter()
        self._last_warn = -float("inf")
        self._shard_errors: set[tuple[str, str, str]] = set()

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def add(self, reason: str, detail: str = "") -> None:
        self.by_reason[reason] += 1
        now = time.monotonic()
        if now - self._last_warn >= self.warn_every_s:
            self._last_warn = now
            log.warning(
                "%s: skipped %d bad sample(s) so far %s; latest: %s",
                self.where,
                self.total,
                dict(self.by_reason),
                detail,
            )

    def tar_handler(self, exn: Exception) -> bool:
        """WebDataset handler for shard opening/reading errors: count once per distinct error (an endless stream
        rereads a truncated shard on every pass and would count the same read error again each time), keep going."""
        detail = f"{type(exn).__name__}: {exn}"
        # WebDataset hands the same error up twice (tar level, then url level, with the url appended to its args):
        # one key per (error, message, shard file).
        message = str(exn.args[0] if exn.args else exn).split(" @ ")[0]
        shard = next(iter(re.findall(r"name='([^']+)'", str(exn))), "")
        key = (type(exn).__name__, message, shard)
        if key not in self._shard_errors:
            self._shard_errors.add(key)
            self.add("shard_error", detail)
        return True


def worker_slot() -> tuple[int, int]:
    """(worker id, number of workers) of the DataLoader worker running this; (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _collate(items: list[tuple[torch.Tensor, str, str]], counter: SkipCounter, worker: int) -> dict[str, Any]:
    return {
        "image": torch.stack([x for x, _, _ in items]),  # (B, 3, R, R) in [-1, 1]
        "key": [k for _, k, _ in items],
        "url": [u for _, _, u in items],
        "skipped": torch.tensor(counter.total, dtype=torch.long),  # this worker's count so far (cumulative)
        "worker": torch.tensor(worker, dtype=torch.long),
    }


def _decode(sample: dict, spec: TransformSpec, rng: random.Random, counter: SkipCounter) -> torch.Tensor | None:
    try:
        return decode_and_crop(image_bytes(sample), spec, rng)
    except BadSample as e:
        counter.add(e.reason, f"{sample.get('__url__')}:{sample.get('__key__')}: {e}")
        return None


# Training stream -----------------------------------------------------------------------------------


def _no_data(urls: Iterable[str], what: str, counter: SkipCounter) -> NoUsableDataError:
    shards = list(urls)
    named = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
    counts = dict(counter.by_reason) or "no samples at all"
    return NoUsableDataError(
        f"{what} {named} yield no usable image (skipped: {counts}); {_fix_hint(counter.by_reason)}"
    )


def _endless_samples(
    urls: tuple[str, ...], rng: random.Random, counter: SkipCounter, pass_sizes: list[int]
) -> Iterator[dict]:
    """Walk the shards in a new random order on every pass (each pass's sample count goes to `pass_sizes`);
    fail loudly if a whole pass yields nothing (empty or unreadable shards)."""
    while True:
        order = list(urls)
        rng.shuffle(order)
        n = 0
        for sample in tarfile_samples(({"url": u} for u in order), handler=counter.tar_handler):
            n += 1
            yield sample
        if n == 0:
            raise _no_data(urls, "training shards", counter)
        pass_sizes.append(n)


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        yield next(rng.choices(streams, weights)[0])


def shuffled(samples: Iterable[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """Reservoir-style buffer shuffle: emit a random buffered sample for each one read."""
    buf: list[dict] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = rng.randrange(size)
        buf[i], s = s, buf[i]
        yield s
    rng.shuffle(buf)
    yield from buf


class TrainStream(IterableDataset):
    """Endless batches for one rank (see the module docstring). Set `.epoch` before iterating."""

    def __init__(
        self,
        sources: list[Source],
        spec: TransformSpec,
        *,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 1000,
        warn_every_s: float = 60.0,
    ) -> None:
        self.sources, self.spec, self.batch_size = sources, spec, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.warn_every_s = shuffle_buffer, warn_every_s
        self.epoch = 0
        for src in sources:
            if len(src.urls) < world_size:
                log.warning(
                    "%d shard(s) for %d ranks: ranks share shards (make more shards for disjoint data)",
                    len(src.urls),
                    world_size,
                )

    def worker_shards(self, worker: int, num_workers: int) -> list[tuple[str, ...]]:
        """The shards this (rank, worker) reads in the current epoch, per source.

        Every rank draws the same permutation (seeded by run seed and epoch only) and takes its slice of it:
        disjoint within the epoch, and a different share of the data for each rank in the next one.
        """
        out = []
        for i, src in enumerate(self.sources):
            shared = random.Random(f"dcae_train/shards/{self.seed}/{self.epoch}/{i}")  # same on every rank
            perm = tuple(shared.sample(src.urls, len(src.urls)))
            out.append(slice_shards(slice_shards(perm, self.rank, self.world_size), worker, num_workers))
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        rng = random.Random(f"dcae_train/train/{self.seed}/{self.epoch}/{self.rank}/{worker}")
        counter = SkipCounter(f"train rank {self.rank} worker {worker}", self.warn_every_s)
        shards = self.worker_shards(worker, num_workers)
        pass_sizes: list[int] = []
        streams = [_endless_samples(urls, rng, counter, pass_sizes) for urls in shards]
        samples = shuffled(_mix(streams, [s.weight for s in self.sources], rng), self.shuffle_buffer, rng)
        batch: list[tuple[torch.Tensor, str, str]] = []
        bad_in_a_row = 0
        for sample in samples:
            x = _decode(sample, self.spec, rng, counter)
            if x is None:
                bad_in_a_row += 1
                # Two full passes (plus the shuffle buffer) without one usable image: there is none to find.
                if pass_sizes and bad_in_a_row > 2 * sum(pass_sizes[: len(streams)]) + self.shuffle_buffer:
                    raise _no_data([u for urls in shards for u in urls], "training shards", counter)
                continue
            bad_in_a_row = 0
            batch.append((x, sample["__key__"], sample.get("__url__", "")))
            if len(batch) == self.batch_size:
                yield _collate(batch, counter, worker)
                batch = []


# Validation stream -----------------------------------------------------------------------------------


class ValStream(IterableDataset):
    """The same finite batches in the same order on every run, worker count and world size."""

    def __init__(
        self,
        urls: list[str],
        spec: TransformSpec,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        max_samples: int | None = None,
        warn_every_s: float = 60.0,
    ) -> None:
        self.urls, self.spec, self.batch_size = list(urls), spec, batch_size
        self.rank, self.world_size, self.max_samples = rank, world_size, max_samples
        self.warn_every_s = warn_every_s

    def _owner(self, batch_index: int, num_workers: int) -> tuple[int, int]:
        return batch_index % self.world_size, (batch_index // self.world_size) % num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = worker_slot()
        counter = SkipCounter(f"val rank {self.rank} worker {worker}", self.warn_every_s)
        rng = random.Random(0)  # centre crop, no flip: nothing random is drawn; kept for the shared signature
        batch: list[tuple[torch.Tensor, str, str]] = []
        done: list[tuple[torch.Tensor, str, str]] = []  # our previous complete batch, held back by one
        current = -1
        samples = tarfile_samples(({"url": u} for u in self.urls), handler=counter.tar_handler)
        read = decoded = good = 0
        for i, sample in enumerate(samples):
            if self.max_samples is not None and i >= self.max_samples:
                break
            read += 1
            b = i // self.batch_size
            if b != current and batch:
                if done:
                    yield _collate(done, counter, worker)
                done, batch = batch, []
            current = b
            if self._owner(b, num_workers) != (self.rank, worker):
                continue  # another rank's or worker's batch: the tar bytes are read, not decoded
            x = _decode(sample, self.spec, rng, counter)
            decoded += 1
            if x is not None:
                good += 1
                batch.append((x, sample["__key__"], sample.get("__url__", "")))
        if read == 0 or (decoded > 0 and good == 0):  # never a silent skip of validation
            raise _no_data(self.urls, "validation shards", counter)
        # The last batch goes out after the whole stream is read, so its `skipped` includes every bad sample.
        for items in (done, batch):
            if items:
                yield _collate(items, counter, worker)


# Loader ---------------------------------------------------------------------------------------------


class SignalProofDataLoader(DataLoader):
    """A DataLoader whose workers survive group signals (`ignore_preemption_signals`) and still never block the
    interpreter's exit: multiprocessing ends daemonic children at exit with SIGTERM, which these workers ignore,
    and then joins them, so a worker of an iterator that was never closed would hang the exit. Their processes
    are tracked here and SIGKILLed first (our exit handler is registered after multiprocessing's, so runs first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("worker_init_fn", functools.partial(ignore_preemption_signals, parent_pid=os.getpid()))
        super().__init__(*args, **kwargs)

    def _get_iterator(self):
        it = super()._get_iterator()
        _LIVE_WORKERS.update(getattr(it, "_workers", []))
        return it


_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _kill_workers_at_exit() -> None:
    live = [proc for proc in list(_LIVE_WORKERS) if proc.is_alive()]
    if not live:
        return
    # torch's SIGCHLD handler would raise "DataLoader worker ... is killed by signal" from inside this function
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for proc in live:
        proc.kill()
    for proc in live:
        proc.join(timeout=5)


def ignore_preemption_signals(worker_id: int = 0, parent_pid: int | None = None) -> None:
    """DataLoader `worker_init_fn`: SLURM, systemd, `timeout` and `kill -- -PGID` signal the whole process group.
    A worker that dies of SIGTERM makes the main process fail with "DataLoader worker ... is killed by signal"
    before it can save; ignoring the signals here lets the main process checkpoint at the next step, then end
    the workers the normal way. If the main process dies (SIGKILL, OOM killer) the worker is killed with it:
    torch's own check of the parent runs only between samples, so a worker busy with one sample (or stuck in
    it) would outlive its parent, holding memory and the inherited lock of the run folder."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG; no library in our stack wraps
    it, hence ctypes). `parent_pid`, the process that built the loader, catches one that died before the call.
    (Under the forkserver start method the parent is the fork server, which ends when that process does.)"""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): workers may outlive a killed run", ctypes.get_errno())
    if parent_pid is not None and os.getppid() != parent_pid:  # not our parent (forkserver), or already gone
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass  # alive, under another uid


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StreamLoader:
    """What Lightning iterates: a DataLoader over a stream (batches are made in the workers), cut to `length`
    batches per epoch (training), with the per-worker skip counts that arrive in the batches summed up.

    `epoch_fn` gives the epoch number used to seed the workers (the trainer's `current_epoch`, so a resumed run
    does not replay epoch 0); without it the loader counts its own iterations. `skip_fn(epoch)` gives the
    batches of that epoch a resumed run has already trained on: the epoch's stream is made again from its seed
    and those batches are read and dropped (decoded, not trained on), so the next batch is exactly the one an
    uninterrupted run would see. (Re-reading costs at most one epoch of decoding; a seekable stream would not.)
    """

    def __init__(
        self,
        dataset: IterableDataset,
        *,
        num_workers: int,
        length: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        epoch_fn: Callable[[], int] | None = None,
        skip_fn: Callable[[int], int] | None = None,
    ) -> None:
        # Named `stream`, not `dataset`: Lightning would take it for a DataLoader and warn about IterableDataset length.
        self.stream, self.length, self.epoch_fn, self.skip_fn = dataset, length, epoch_fn, skip_fn
        self.loader = SignalProofDataLoader(
            dataset,
            batch_size=None,  # batched inside the workers
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
            persistent_workers=False,  # workers restart each epoch and pick up the new epoch's seed
        )
        self._iterations = 0
        self._skipped_done = 0  # from finished iterations
        self._skipped_now: dict[int, int] = {}  # worker -> latest cumulative count in the running iteration

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("the validation stream has no precomputed length")  # Lightning then reads to the end
        return self.length

    @property
    def skipped(self) -> int:
        return self._skipped_done + sum(self._skipped_now.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip = 0
        if isinstance(self.stream, TrainStream):  # the validation stream is the same every time
            self.stream.epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
            skip = self.skip_fn(self.stream.epoch) if self.skip_fn is not None else 0
        self._iterations += 1
        self._skipped_done, self._skipped_now = self.skipped, {}
        it = iter(self.loader)
        try:
            for n, batch in enumerate(it):
                if self.length is not None and n >= self.length:
                    break
                self._skipped_now[int(batch["worker"])] = int(batch["skipped"])
                if n >= skip:  # the first `skip` batches were trained on before the resume
                    yield batch
        finally:
            del it  # shuts the workers down, also when the consumer stops early
