"""encode_dataset: image shards -> latent shards (issue 19). Tiny variant, CPU, tens of images.

Decoded latents equal model.decode(model.encode(x)) on the evaluation crops; a SIGKILLed run resumes to the same
bytes; two ranks write disjoint shards whose union and statistics equal one process's; buckets group by aspect ratio;
captions pass through; bad input stops with exit code 2 before any encoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_data import jpeg, write_tar
from PIL import Image

from dcae_train.data.buckets import SANA_1024, cover_box, nearest_bucket, read_buckets, sana_buckets
from dcae_train.data.latents import LatentDataset, latent_from_bytes
from dcae_train.data.shards import ShardWriter, write_atomic
from dcae_train.encode_dataset import main
from dcae_train.evaluation.data import adm_center_crop, to_tensor
from dcae_train.evaluation.latents import LatentAccumulator
from dcae_train.models import build_model

RES = 32  # the tiny variant compresses 8x: 4 x 4 latents
MODEL = ["--model", "tiny", "--random-init", "--seed", "0"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Conv results depend on the number of intra-op threads (reduction order, ~3e-6), and earlier tests in the
    same process may have changed it (Lightning's DDP sets it per process): every run here, in this process or in
    a forked one, encodes with one thread, so bitwise comparisons between them hold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model():
    torch.manual_seed(0)  # what --random-init --seed 0 builds
    return build_model("tiny").eval()


def source_shards(folder: Path, shards: int = 3, per_shard: int = 3, bad: bool = True) -> Path:
    """Shards of photo-like JPEGs of several sizes with a caption (.txt) and metadata (.json); one corrupt sample."""
    for i in range(shards):
        samples = []
        for j in range(per_shard):
            w, h = [(48, 40), (80, 40), (40, 72), (64, 64)][(i + j) % 4]
            caption = f"photo {i}-{j}"
            info = json.dumps({"caption": caption, "width": w, "height": h}).encode()
            image = jpeg(w, h, seed=10 * i + j)
            samples.append({"__key__": f"s{i}_{j}", "jpg": image, "txt": caption.encode(), "json": info})
        if bad and i == 1:
            samples.append({"__key__": "corrupt", "jpg": b"\xff\xd8\xff\xe0 not a jpeg", "txt": b"lost"})
        write_tar(folder / f"src-{i:06d}.tar", samples)
    return folder


def encode(src, out: Path, *extra: str) -> int:
    return main([*MODEL, "--data", str(src), "--out", str(out), "--resolution", str(RES), "--batch-size", "3",
                 "--num-workers", "0", "--no-progress", *extra])  # fmt: skip


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, field = m.name.split(".", 1)
            samples.setdefault(key, {})[field] = tar.extractfile(m).read()
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("latents-*.tar"))}


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    """One uninterrupted single-process run, shared by the tests that compare against it."""
    root = tmp_path_factory.mktemp("square")
    src = source_shards(root / "src")
    assert encode(src, root / "out", "--num-workers", "2") == 0
    return src, root / "out"


# Square crops ---------------------------------------------------------------------------------------------
def test_latents_decode_as_the_model_does_and_captions_pass_through(square):
    src, out = square
    model = tiny_model()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["samples"] == 9 and manifest["read"] == 10
    assert manifest["skipped_by_reason"] == {"undecodable": 1} and manifest["skipped"][0]["key"] == "corrupt"
    sources = {k: s for p in sorted(src.glob("*.tar")) for k, s in read_shard(p).items()}
    written = {k: s for p in sorted(out.glob("latents-*.tar")) for k, s in read_shard(p).items()}
    assert sorted(written) == sorted(k for k in sources if k != "corrupt")
    z = torch.stack([latent_from_bytes(s["npy"], "npy") for s in written.values()])
    x = torch.stack([to_tensor(adm_center_crop(Image.open(io.BytesIO(sources[k]["jpg"])), RES)) for k in written])
    with torch.no_grad():
        z_ref = model.encode(x)  # the evaluation crop, one batch
        assert torch.allclose(z, z_ref, atol=1e-5)
        assert torch.allclose(model.decode(z), model.decode(z_ref), atol=1e-5)
    for key, sample in written.items():
        assert sample["txt"] == sources[key]["txt"] and sample["json"] == sources[key]["json"]
        meta = json.loads(sample["latent.json"])
        assert meta["key"] == key and meta["bucket"] == [RES, RES] and not meta["tiled"] and "jpg" not in sample


def test_dcae15_prefix_stores_the_first_channels_as_the_model_encodes_them(tmp_path):
    src = source_shards(tmp_path / "src", shards=1, bad=False)
    model_args = ["--model", "tiny-1.5", "--random-init", "--seed", "0"]
    argv = ["--data", str(src), "--resolution", str(RES), "--num-workers", "0", "--no-progress"]
    assert main([*model_args, *argv, "--out", str(tmp_path / "out"), "--latent-channels", "8"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["model"]["latent_channels"] == 8 and manifest["model"]["model_latent_channels"] == 16
    assert len(manifest["statistics"]["per_channel_rms"]) == 8
    written = {k: s for p in sorted((tmp_path / "out").glob("latents-*.tar")) for k, s in read_shard(p).items()}
    sources = read_shard(next(src.glob("*.tar")))
    torch.manual_seed(0)
    model = build_model("tiny-1.5").eval()
    x = torch.stack([to_tensor(adm_center_crop(Image.open(io.BytesIO(sources[k]["jpg"])), RES)) for k in written])
    z = torch.stack([latent_from_bytes(s["npy"], "npy") for s in written.values()])
    with torch.no_grad():
        assert torch.allclose(z, model.encode(x, latent_channels=8), atol=1e-5)
        assert torch.allclose(z, model.encode(x)[:, :8], atol=1e-5)
    assert main([*model_args, *argv, "--out", str(tmp_path / "out"), "--latent-channels", "4"]) == 2  # another prefix


def test_statistics_are_those_of_the_stored_latents(square):
    _, out = square
    acc = LatentAccumulator(8)
    for shard in sorted(out.glob("latents-*.tar")):
        for sample in read_shard(shard).values():
            acc.update(latent_from_bytes(sample["npy"], "npy")[None])
    expected, stats = acc.summary(), json.loads((out / "manifest.json").read_text())["statistics"]
    for k in ("mean", "rms", "scaling_factor", "per_channel_mean", "per_channel_std", "per_channel_rms"):
        assert np.allclose(stats[k], expected[k], rtol=1e-12), k
    arrays = np.load(out / "latent_stats.npz")
    assert np.allclose(arrays["rms"], expected["per_channel_rms"]) and arrays["std"].shape == (8,)


def test_reader_scales_splits_and_decodes_fields(square):
    _, out = square
    manifest = json.loads((out / "manifest.json").read_text())
    plain = list(LatentDataset(out))
    assert len(plain) == 9 and plain[0]["txt"].startswith("photo") and plain[0]["json"]["caption"]
    measured = list(LatentDataset(out, scale="measured"))
    factor = manifest["statistics"]["scaling_factor"]
    assert torch.allclose(measured[0]["latent"], plain[0]["latent"] * factor)
    assert next(iter(LatentDataset(out, scale="model")))["latent"].equal(plain[0]["latent"])  # tiny's factor is 1
    halves = [[s["key"] for s in LatentDataset(out, rank=r, world_size=2)] for r in (0, 1)]
    assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == sorted(s["key"] for s in plain)
    batches = list(LatentDataset(out, batch_size=4, shuffle=4, seed=1))
    assert [len(b["key"]) for b in batches] == [4, 4, 1] and batches[0]["latent"].shape == (4, 8, 4, 4)


# Resuming and ranks: real processes -----------------------------------------------------------------------
def _run_rank(argv: list[str], env: dict[str, str], log: str) -> None:
    """A process as torchrun starts one: RANK / WORLD_SIZE in the environment, the CLI's exit code as its own."""
    os.environ.update(env)
    torch.set_num_threads(1)  # as the runs in the test process (_one_thread)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        code = main(argv)
    sys.exit(code)


@pytest.fixture(scope="module")
def processes():
    """Processes forked from a server that imported the tool once (a fresh interpreter per process costs seconds of
    imports each; the server has computed nothing with torch, so forking it is safe)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["dcae_train.encode_dataset"])
    return ctx


def _argv(src, out: Path, *extra: str) -> list[str]:
    return [*MODEL, "--data", str(src), "--out", str(out), "--resolution", str(RES), "--batch-size", "3",
            "--no-progress", *extra]  # fmt: skip


def test_killed_run_resumes_to_the_same_shards(processes, tmp_path):
    src = source_shards(tmp_path / "src", shards=4, per_shard=2, bad=False)
    slow = f"pipe:sleep 0.3 && cat {src}/src-{{000000..000003}}.tar"  # each shard takes 0.3 s to arrive
    assert encode(slow, tmp_path / "whole", "--num-workers", "2") == 0
    out = tmp_path / "killed"
    proc = processes.Process(target=_run_rank, args=(_argv(slow, out, "--num-workers", "0"), {}, str(tmp_path / "log")))
    proc.start()
    deadline = time.monotonic() + 120
    while not (out / "latents-000000.tar").exists() and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    finished = shard_bytes(out)
    assert 1 <= len(finished) < 4, "the kill came mid-way"
    whole = shard_bytes(tmp_path / "whole")
    assert all(finished[n] == whole[n] for n in finished), "a shard under its final name is complete"
    # A partial shard as a kill during writing leaves it: the rerun must redo it, not trust it.
    (out / "latents-000003.tar.tmp").write_bytes(whole["latents-000003.tar"][:1000])
    assert encode(slow, out, "--num-workers", "1") == 0
    assert shard_bytes(out) == whole and not list(out.glob("*.tmp"))
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, tmp_path / "whole")]
    assert manifests[0] == manifests[1]


def test_two_ranks_write_disjoint_shards_equal_to_one_process(processes, square, tmp_path):
    src, single = square
    out, logs = tmp_path / "ranks", [tmp_path / f"rank{r}.log" for r in (0, 1)]
    env = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2"} for r in (0, 1)]
    procs = [processes.Process(target=_run_rank, args=(_argv(src, out, "--num-workers", "1"), env[r], str(logs[r])))
             for r in (0, 1)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0], [log.read_text() for log in logs]
    # Rank 0 wrote shards 0 and 2 (6 latents), rank 1 shard 1 (3 latents and the corrupt sample).
    assert "rank 0: 6 latents" in logs[0].read_text() and "rank 1: 3 latents" in logs[1].read_text()
    assert shard_bytes(out) == shard_bytes(single)
    merged, alone = (json.loads((d / "manifest.json").read_text()) for d in (out, single))
    assert merged["statistics"] == alone["statistics"] and merged == alone


# Buckets and tiling ---------------------------------------------------------------------------------------
def test_sana_table_is_sanas_at_512_and_rounds_to_the_compression():
    table = sana_buckets(512, 32)
    assert len(table) == 40 and table[0] == (256, 1024) and (288, 896) in table and (512, 512) in table
    assert table == tuple((h // 2, w // 2) for h, w in SANA_1024)  # SANA's ASPECT_RATIO_512
    assert all(h % 64 == 0 and w % 64 == 0 for h, w in sana_buckets(512, 64))
    assert nearest_bucket(200, 100, table) == (352, 704) and nearest_bucket(100, 200, table) == (704, 352)
    assert cover_box(200, 100, (100, 100)) == (50.0, 0.0, 150.0, 100.0)


def test_buckets_group_images_by_aspect_ratio(tmp_path):
    src = source_shards(tmp_path / "src", shards=1, per_shard=4, bad=False)
    table = tmp_path / "buckets.json"
    table.write_text(json.dumps({"0.5": [24, 48], "1.0": [32, 32], "2.0": [48, 24]}))  # SANA's form: ratio -> [h, w]
    assert encode(src, tmp_path / "out", "--buckets", str(table), "--small-images", "upsample") == 0
    seen = {}
    for shard in sorted((tmp_path / "out").glob("latents-*.tar")):
        for sample in read_shard(shard).values():
            meta, z = json.loads(sample["latent.json"]), latent_from_bytes(sample["npy"], "npy")
            seen[(meta["width"], meta["height"])] = tuple(meta["bucket"])
            assert z.shape[1:] == (meta["bucket"][0] // 8, meta["bucket"][1] // 8)
    assert seen == {(48, 40): (32, 32), (80, 40): (24, 48), (40, 72): (48, 24), (64, 64): (32, 32)}
    buckets = json.loads((tmp_path / "out" / "manifest.json").read_text())["buckets"]
    assert [(b["height"], b["width"], b["samples"]) for b in buckets] == [(24, 48, 1), (32, 32, 2), (48, 24, 1)]
    for batch in LatentDataset(tmp_path / "out", batch_size=2):
        assert len({tuple(m["bucket"]) for m in batch["meta"]}) == 1  # one bucket per batch
    with pytest.raises(ValueError, match="multiples of the model.s compression 128"):
        read_buckets(str(table), 512, 16 * 8)


def test_large_crops_go_through_the_tiled_encoder(tmp_path):
    src = source_shards(tmp_path / "src", shards=1, per_shard=2, bad=False)
    assert encode(src, tmp_path / "out", "--tile-above", "1000", "--tile", "16", "--format", "safetensors") == 0
    model = tiny_model()
    for key, sample in read_shard(tmp_path / "out" / "latents-000000.tar").items():
        assert json.loads(sample["latent.json"])["tiled"]
        raw = read_shard(src / "src-000000.tar")[key]["jpg"]
        x = to_tensor(adm_center_crop(Image.open(io.BytesIO(raw)), RES))[None]
        with torch.no_grad():
            assert torch.allclose(latent_from_bytes(sample["safetensors"], "safetensors")[None],
                                  model.tiled_encode(x, tile=16), atol=1e-5)  # fmt: skip


def test_image_folder_with_caption_files(tmp_path):
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(jpeg(40, 40, seed=i))
        (folder / f"p{i}.txt").write_text(f"caption {i}")
    assert encode(tmp_path / "photos", tmp_path / "out", "--samples-per-shard", "2", "--latent-dtype", "fp16") == 0
    shards = sorted((tmp_path / "out").glob("latents-*.tar"))
    assert len(shards) == 3
    samples = {k: s for p in shards for k, s in read_shard(p).items()}
    assert sorted(samples) == [f"{i:09d}" for i in range(5)]
    assert json.loads(samples["000000003"]["latent.json"])["key"] == os.path.join("a", "p3.jpg")
    assert samples["000000003"]["txt"] == b"caption 3"
    assert latent_from_bytes(samples["000000000"]["npy"], "npy").dtype == torch.float16


# Bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--latent-dtype", "bf16"], "--format safetensors"),
        (["--resolution", "36"], "--resolution=36: must be a multiple of the model's compression 8"),
        (["--batch-size", "0"], "--batch-size=0: must be >= 1"),
        (["--buckets", "no-such.json"], "--buckets='no-such.json'"),
        (["--latent-channels", "4"], "--latent-channels=4: --latent-channels: this model has a shortcut"),
    ],
)
def test_bad_flags_exit_2_before_any_work(square, tmp_path, capsys, extra, match):
    src, _ = square
    assert encode(src, tmp_path / "out", *extra) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_missing_model_and_another_models_folder_are_refused(square, tmp_path, capsys):
    src, out = square
    missing = main(["--model", str(tmp_path / "no.ckpt"), "--data", str(src), "--out", str(tmp_path / "o")])
    assert missing == 2 and "no.ckpt" in capsys.readouterr().err and not (tmp_path / "o").exists()
    before = shard_bytes(out)
    assert encode(src, out, "--seed", "1") == 2  # other random weights: another model
    assert "model_sha256" in capsys.readouterr().err and shard_bytes(out) == before
    assert encode(src, out, "--latent-dtype", "fp16") == 2
    assert "latent_dtype: 'fp32' there, 'fp16' now" in capsys.readouterr().err
    assert encode(src, out) == 0 and shard_bytes(out) == before  # the same settings: nothing left to do
    assert "3 of 3 shards were already done" in capsys.readouterr().out


# Building blocks ------------------------------------------------------------------------------------------
def test_accumulator_state_round_trips_through_json_and_merges_exactly():
    z = torch.randn(6, 4, 3, 5, dtype=torch.float64)
    whole, parts = LatentAccumulator(4), [LatentAccumulator(4) for _ in range(3)]
    whole.update(z)
    for part, chunk in zip(parts, z.split(2), strict=True):
        part.update(chunk)
    restored = [LatentAccumulator.from_state(json.loads(json.dumps(p.state()))) for p in parts]
    assert all(r.total.equal(p.total) and r.total_sq.equal(p.total_sq) for r, p in zip(restored, parts, strict=True))
    merged = restored[0].merge(restored[1]).merge(restored[2])
    assert merged.count == whole.count and torch.allclose(merged.total, whole.total, rtol=1e-14)
    assert merged.summary()["per_channel_rms"] == pytest.approx(whole.summary()["per_channel_rms"], rel=1e-12)


def test_shard_writer_shows_a_shard_only_when_complete(tmp_path):
    writer = ShardWriter(tmp_path / "a.tar")
    writer.add("k.txt", b"x")
    assert not (tmp_path / "a.tar").exists() and (tmp_path / "a.tar.tmp").exists()
    writer.commit()
    assert read_shard(tmp_path / "a.tar") == {"k": {"txt": b"x"}} and not (tmp_path / "a.tar.tmp").exists()
    aborted = ShardWriter(tmp_path / "b.tar")
    aborted.abort()
    assert not list(tmp_path.glob("b.tar*"))
    assert write_atomic(tmp_path / "m.json", b"1") and not write_atomic(tmp_path / "m.json", b"2", replace=False)
    assert (tmp_path / "m.json").read_bytes() == b"1" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a.tar", "m.json"]  # fmt: skip
