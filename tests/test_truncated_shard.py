"""Issue 15 item 8: a truncated shard's read error counts once, not once per pass of the endless stream."""

from __future__ import annotations

import io
import itertools
import random
import tarfile

from dcae_train.data.webdataset import SkipCounter, _endless_samples


def test_a_truncated_shards_read_error_counts_once(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = bytes(range(256)) * 8
            info = tarfile.TarInfo(f"{i:04d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = tmp_path / "cut.tar"
    shard.write_bytes(buf.getvalue()[: 512 * 2 + 2048 + 512 + 700])  # cut in the middle of the second member
    counter = SkipCounter("test", warn_every_s=1e9)
    samples = list(itertools.islice(_endless_samples((str(shard),), random.Random(0), counter, []), 5))
    assert len(samples) == 5  # five passes over the one readable member
    assert counter.by_reason == {"shard_error": 1}
