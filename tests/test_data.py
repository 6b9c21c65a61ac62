"""Data pipeline: config checks, decoding of awkward and bad images, train/val streams, shards, demo, DataModule."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers_data import clean_shards, encode, jpeg, messy_samples, photo, png, png_bomb, write_tar
from _helpers_scripts import load_script
from PIL import Image, ImageOps

from dcae_train import cli
from dcae_train.config import to_config
from dcae_train.data import DataConfig, TrainStream, TransformSpec, ValStream, demo_shards
from dcae_train.data.shards import list_images, write_shards
from dcae_train.data.specs import sources_from_spec
from dcae_train.data.transforms import BadSample, decode_and_crop
from dcae_train.data.webdataset import StreamLoader
from dcae_train.training.datamodule import ImageDataModule

# Config -------------------------------------------------------------------------------------------


def test_config_unknown_key_named():
    with pytest.raises(ValueError, match="data.shufle_buffer: not a config key; did you mean data.shuffle_buffer"):
        to_config({"data": {"train": "demo", "shufle_buffer": 10}})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"crop": "centre"}, "data.crop"),
        ({"small_images": "pad"}, "data.small_images"),
        ({"epoch_batches": 0}, "epoch_batches"),
        ({"crop_scale": [0.5, 0.2]}, "crop_scale"),
        ({"train": "shards/{0..3}.tar"}, "data.val=None: is required when data.train names your shards"),
        ({"train": [{"spec": "a.tar", "weight": 0}], "val": "demo"}, r"data.train\[0\].weight"),
        ({"train": [{"spec": "a.tar", "wieght": 1}], "val": "demo"}, "wieght"),
    ],
)
def test_config_bad_values_named(kw, match):
    with pytest.raises(ValueError, match=match):  # through the schema, the error names the full key
        to_config({"data": {"train": "demo", **kw}})
    with pytest.raises(ValueError, match=match.replace("data.", "")):  # built directly: the keys of DataConfig
        DataConfig(**{"train": "demo", **kw})


def test_config_alias_and_mixture(tmp_path):
    a, b = clean_shards(tmp_path, [1, 1])
    cfg = to_config({"data": {"crop": "adm", "train": [{"spec": a, "weight": 2}, {"spec": [b]}], "val": b}}).data
    assert cfg.crop == "center" and cfg.train[0]["weight"] == 2


def test_missing_local_shards_named(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        sources_from_spec(str(tmp_path / "x-{000..003}.tar"), "data.train")


def test_spec_forms(tmp_path):
    urls = clean_shards(tmp_path, [1, 1, 1])
    assert sources_from_spec(str(tmp_path / "shard-{000000..000002}.tar"), "t")[0].urls == tuple(urls)
    assert sources_from_spec(str(tmp_path), "t")[0].urls == tuple(urls)  # a folder of shards
    assert sources_from_spec(f"{urls[0]}::{urls[2]}", "t")[0].urls == (urls[0], urls[2])
    mix = sources_from_spec([{"spec": urls[:2], "weight": 3}, {"spec": urls[2]}], "t")
    assert [(len(s.urls), s.weight) for s in mix] == [(2, 3.0), (1, 1.0)]


# Decoding and transforms ------------------------------------------------------------------------------


@pytest.mark.parametrize("crop", ["center", "random", "random_resized"])
def test_decode_shapes_and_range(crop):
    spec = TransformSpec(resolution=48, crop=crop, flip=True)
    x = decode_and_crop(jpeg(120, 90), spec, random.Random(0))
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_reduced_scale_decode_matches_full_decode():
    data = jpeg(1024, 768, quality=95)
    fast = decode_and_crop(data, TransformSpec(resolution=64, fast_decode=True), random.Random(0))
    full = decode_and_crop(data, TransformSpec(resolution=64, fast_decode=False), random.Random(0))
    psnr = 10 * torch.log10(4 / (fast - full).pow(2).mean())  # signals in [-1, 1]: peak-to-peak 2
    assert psnr > 30, f"reduced-scale JPEG decode differs too much from the full decode: {psnr:.1f} dB"


def test_small_image_policy():
    small = jpeg(40, 30)
    with pytest.raises(BadSample) as e:
        decode_and_crop(small, TransformSpec(resolution=64, small_images="skip"), random.Random(0))
    assert e.value.reason == "too_small"
    x = decode_and_crop(small, TransformSpec(resolution=64, small_images="upsample"), random.Random(0))
    assert x.shape == (3, 64, 64)


@pytest.mark.parametrize(
    "data, reason",
    [
        (png_bomb(), "too_many_pixels"),
        (png(2000, 70), "absurd_aspect"),
        (b"\x89PNG\r\n\x1a\n garbage", "undecodable"),
        (jpeg(96, 80)[:300], "undecodable"),
    ],
)
def test_bad_bytes_reasons(data, reason):
    with pytest.raises(BadSample) as e:
        decode_and_crop(data, TransformSpec(resolution=32), random.Random(0))
    assert e.value.reason == reason


def test_alpha_composited_on_white():
    from _helpers_data import encode
    from PIL import Image

    transparent = encode(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG")
    x = decode_and_crop(transparent, TransformSpec(resolution=32), random.Random(0))
    assert torch.allclose(x, torch.ones_like(x))


# Bad samples in a stream -------------------------------------------------------------------------------


def test_messy_shard_yields_only_valid_tensors_and_counts_every_bad_sample(tmp_path):
    samples, num_bad = messy_samples()
    url = str(write_tar(tmp_path / "messy-000000.tar", samples))
    cfg = DataConfig(train=url, val=url, num_workers=0, val_num_workers=0, warn_every_s=3600)
    dm = ImageDataModule(cfg, resolution=64, batch_size=3)
    dm.setup()
    images, keys = [], []
    for batch in dm.val_dataloader():
        images.append(batch["image"])
        keys += batch["key"]
    x = torch.cat(images)
    assert x.shape == (len(samples) - num_bad, 3, 64, 64) and torch.isfinite(x).all()
    assert x.min() >= -1 and x.max() <= 1
    assert dm.skipped_samples() == num_bad
    assert not any(k in keys for k in ("corrupt", "truncated", "tiny", "bomb", "missing_key", "empty"))

    # The endless training stream over the same shard: only valid crops, bad ones counted as they pass by.
    for seen, batch in enumerate(dm.train_dataloader(), start=1):
        assert batch["image"].shape == (3, 3, 64, 64) and batch["image"].abs().max() <= 1
        if seen == 6:
            break
    assert dm.skipped_samples() > num_bad  # the train stream has passed bad samples too


def test_warning_is_rate_limited(tmp_path, caplog):
    samples = [{"__key__": f"b{i}", "jpg": b"bad"} for i in range(20)] + [{"__key__": "ok", "jpg": jpeg()}]
    url = str(write_tar(tmp_path / "bad.tar", samples))
    with caplog.at_level("WARNING", logger="dcae_train.data"):
        batches = list(ValStream([url], TransformSpec(resolution=32), batch_size=1000, warn_every_s=3600))
    assert int(batches[-1]["skipped"]) == 20
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1


# Validation stream --------------------------------------------------------------------------------------


def _val_run(urls, workers, rank=0, world=1, bs=4, max_samples=None):
    stream = ValStream(urls, TransformSpec(resolution=32), batch_size=bs, rank=rank, world_size=world,
                       max_samples=max_samples)  # fmt: skip
    batches = list(StreamLoader(stream, num_workers=workers))
    return [k for b in batches for k in b["key"]], torch.cat([b["image"] for b in batches])


def test_val_stream_identical_across_runs_and_workers(tmp_path):
    urls = clean_shards(tmp_path, [5, 3, 6])
    keys1, x1 = _val_run(urls, workers=1)
    keys1b, x1b = _val_run(urls, workers=1)
    keys2, x2 = _val_run(urls, workers=2)
    assert keys1 == keys1b == keys2 and len(keys1) == 14
    assert torch.equal(x1, x1b) and torch.equal(x1, x2)
    # Two ranks: batch b on rank b % 2; interleaved they give back the single-process order.
    r0, _ = _val_run(urls, workers=2, rank=0, world=2)
    r1, _ = _val_run(urls, workers=1, rank=1, world=2)
    chunks = [r0[i : i + 4] for i in range(0, len(r0), 4)], [r1[i : i + 4] for i in range(0, len(r1), 4)]
    merged = [k for i in range(len(chunks[0])) for c in chunks for k in (c[i] if i < len(c) else [])]
    assert merged == keys1
    assert _val_run(urls, workers=2, max_samples=6)[0] == keys1[:6]


# Training stream -----------------------------------------------------------------------------------


def _train_keys(urls, *, seed=0, rank=0, world=1, epoch=0, workers=0, batches=4):
    stream = TrainStream(sources_from_spec(urls, "t"), TransformSpec(resolution=32, crop="random", flip=True),
                         batch_size=2, seed=seed, rank=rank, world_size=world, shuffle_buffer=4)  # fmt: skip
    loader = StreamLoader(stream, num_workers=workers, length=batches, epoch_fn=lambda: epoch)
    out = list(loader)
    assert len(out) == batches
    return [k for b in out for k in b["key"]], torch.cat([b["image"] for b in out])


def test_train_stream_seeding(tmp_path):
    urls = clean_shards(tmp_path, [6, 6, 6, 6])
    k0, x0 = _train_keys(urls)
    k0b, x0b = _train_keys(urls)
    assert k0 == k0b and torch.equal(x0, x0b)  # reproducible from the run seed
    assert _train_keys(urls, epoch=1)[0] != k0  # a new order every epoch
    assert _train_keys(urls, seed=1)[0] != k0


def test_train_shards_disjoint_per_rank_and_worker(tmp_path):
    urls = clean_shards(tmp_path, [3, 7, 2, 9, 4, 5, 6, 1])
    stream = TrainStream(sources_from_spec(urls, "t"), TransformSpec(resolution=32), batch_size=2,
                         rank=1, world_size=2)  # fmt: skip
    w0, w1 = (set(stream.worker_shards(w, 2)[0]) for w in (0, 1))
    other = TrainStream(sources_from_spec(urls, "t"), TransformSpec(resolution=32), batch_size=2, world_size=2)
    rank0 = set(other.worker_shards(0, 1)[0])
    assert not w0 & w1 and not (w0 | w1) & rank0 and w0 | w1 | rank0 == set(urls)
    stream.epoch = other.epoch = 1  # a new split next epoch, still disjoint
    assert set(stream.worker_shards(0, 1)[0]) != w0 | w1
    assert not set(stream.worker_shards(0, 1)[0]) & set(other.worker_shards(0, 1)[0])
    # Uneven shards, 2 workers: exactly `length` batches, and only this rank's shards are read.
    keys, _ = _train_keys(urls, rank=1, world=2, workers=2, batches=10)
    assert {urls[int(k.split("_")[0][1:])] for k in keys} <= w0 | w1  # keys are s<shard>_<index>


def test_mixture_weights(tmp_path):
    a = clean_shards(tmp_path / "a", [8], prefix="a")
    b = clean_shards(tmp_path / "b", [8], prefix="b")
    stream = TrainStream(sources_from_spec([{"spec": a, "weight": 3}, {"spec": b, "weight": 1}], "t"),
                         TransformSpec(resolution=16), batch_size=8, shuffle_buffer=1)  # fmt: skip
    loader = StreamLoader(stream, num_workers=0, length=12)
    urls = [u for batch in loader for u in batch["url"]]
    share_a = sum("a-" in Path(u).name for u in urls) / len(urls)
    assert 0.6 < share_a < 0.9


# Shard writing ----------------------------------------------------------------------------------


def test_make_shards_folder_manifest_and_overwrite(tmp_path):
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    for i in range(7):
        (src / ("sub" if i % 2 else "") / f"img.{i}.jpg").write_bytes(jpeg(200, 120, seed=i))
    (src / "big.png").write_bytes(png(500, 300))
    (src / "broken.jpg").write_bytes(b"nope")
    out = tmp_path / "shards"
    report = write_shards(list_images(src), out, samples_per_shard=3, max_side=256, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["total"] == 8 and [s["samples"] for s in manifest["shards"]] == [3, 3, 2]
    assert len(manifest["skipped"]) == 1 and "broken" in manifest["skipped"][0]["path"]
    keys, x = _val_run(sorted(str(p) for p in out.glob("*.tar")), workers=0)
    assert len(keys) == 8 and all("." not in k for k in keys)
    assert report.pattern.endswith("shard-{000000..000002}.tar")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(list_images(src), out, progress=False)
    assert write_shards(list_images(src), out, samples_per_shard=100, overwrite=True, progress=False).total == 8
    assert len(list(out.glob("*.tar"))) == 1


def test_make_shards_script_cli(tmp_path, capsys):
    import subprocess
    import sys

    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(64, 64, seed=i))
    lst = tmp_path / "list.txt"
    lst.write_text("images/0.jpg\nimages/2.jpg\n")
    args = [str(lst), str(tmp_path / "out"), "--samples-per-shard", "1"]
    root = Path(__file__).resolve().parents[1]
    script = root / "scripts" / "make_shards.py"
    subprocess.run([sys.executable, str(script), *args, "--no-progress"], check=True, cwd=root, capture_output=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["total"] == 2
    module = load_script("make_shards")  # the same main(), in this process
    assert module.main(args) == 2 and "overwrite" in capsys.readouterr().err


# Demo dataset ----------------------------------------------------------------------------------------


def _build_demo(cache: str, queue) -> None:
    queue.put(demo_shards(cache)["train"])


def test_demo_builds_offline_fast_and_race_safe(tmp_path):
    import time

    ctx = mp.get_context("fork")  # the children share this process's imports: the race is on the build alone
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_build_demo, args=(str(tmp_path), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    elapsed = time.perf_counter() - t0
    assert all(p.exitcode == 0 for p in procs)
    specs = {queue.get(timeout=5) for _ in procs}
    assert len(specs) == 1 and elapsed < 60
    info = demo_shards(tmp_path)
    assert info["num_train"] == 384 and info["num_val"] == 32
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")]  # no leftover temp dirs
    keys, x = _val_run(sources_from_spec(info["val"], "v")[0].urls, workers=0)
    assert len(keys) == 32 and x.shape[1:] == (3, 32, 32)


# DataModule under Lightning ------------------------------------------------------------------------


def test_datamodule_with_lightning_trainer(tmp_path, monkeypatch):
    import lightning as L

    monkeypatch.setenv("DCAE_TRAIN_CACHE", str(tmp_path / "cache"))

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_shapes, self.val_batches = [], 0

        def training_step(self, batch, _):
            self.train_shapes.append(tuple(batch["image"].shape))
            return (self.w * batch["image"].mean()).sum()

        def validation_step(self, batch, _):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ImageDataModule(
        DataConfig(train="demo", num_workers=1, val_num_workers=1, epoch_batches=3), resolution=64, batch_size=2, seed=3
    )
    probe = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, max_epochs=-1, val_check_interval=5,
                        check_val_every_n_epoch=None, limit_val_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(probe, datamodule=dm)
    assert probe.train_shapes == [(2, 3, 64, 64)] * 5  # 3 batches in epoch 0, 2 in epoch 1
    assert probe.val_batches >= 2 and dm.skipped_samples() == 0  # limit_val_batches=2 per validation run


# Data that yields nothing usable fails fast ------------------------------------------------------------------
NOTHING_USABLE = {
    "no_image_members": ([{"__key__": f"k{i}", "txt": b"a caption"} for i in range(6)], [], "missing_image_key"),
    "all_too_small": ([{"__key__": f"k{i}", "jpg": jpeg(24, 24, seed=i)} for i in range(6)], [], "too_small"),
    "empty_tar": ([], [], "no samples at all"),
}


@pytest.mark.parametrize("case", sorted(NOTHING_USABLE))
def test_training_data_with_nothing_usable_fails_fast_naming_shard_reason_and_fix(tmp_path, capsys, case):
    samples, _, reason = NOTHING_USABLE[case]
    shard = write_tar(tmp_path / "bad-000000.tar", samples)
    good_val = clean_shards(tmp_path / "val", [4])[0]
    args = ["debug=smoke", "data=webdataset", f"data.train={shard}", f"data.val={good_val}", "data.num_workers=2",
            "data.shuffle_buffer=8", "validate_at_start=false", f"runs_dir={tmp_path / 'runs'}"]  # fmt: skip
    start = time.monotonic()
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert time.monotonic() - start < 120, "fails, does not spin"
    assert str(shard) in err and reason in err and "Traceback" not in err, err
    if case == "all_too_small":
        assert "data.small_images=upsample" in err


def test_non_tar_shard_and_empty_validation_set_are_clear_errors(tmp_path, capsys):
    not_tar = tmp_path / "notes-000000.tar"
    not_tar.write_text("this is not a tar file\n" * 10)
    good = clean_shards(tmp_path / "train", [4])[0]
    base = ["debug=smoke", "data=webdataset", "data.num_workers=0", "validate_at_start=false"]
    code = cli.main([*base, f"data.train={not_tar}", f"data.val={good}", f"runs_dir={tmp_path / 'a'}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG and str(not_tar) in err and "shard_error" in err, err
    empty_val = write_tar(tmp_path / "val-000000.tar", [])
    code = cli.main([*base, "validate_at_start=true", f"data.train={good}", f"data.val={empty_val}",
                     f"runs_dir={tmp_path / 'b'}"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG and "validation shards" in err and str(empty_val) in err, err


# Images as people have them: EXIF orientation and 16-bit PNGs, one decoder everywhere -----------------------
def _rotated_jpeg(tmp_path: Path) -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 (viewers rotate it 90 degrees clockwise), and what a
    viewer shows: the stored pixels transposed (a portrait image)."""
    stored = Image.fromarray(photo(96, 64, seed=3))  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")
    assert shown.size == (64, 96)
    return buf.getvalue(), shown


def test_exif_orientation_is_applied_in_training_evaluation_and_reconstruct(tmp_path):
    from dcae_train import reconstruct
    from dcae_train.evaluation.data import load_image

    data, shown = _rotated_jpeg(tmp_path)
    spec = TransformSpec(resolution=32, crop="center", fast_decode=False)
    want = decode_and_crop(encode(shown, "PNG"), spec, random.Random(0))
    got = decode_and_crop(data, spec, random.Random(0))
    assert (got - want).abs().mean() < 0.03, "training sees the image upright"
    assert (load_image(data, 32) - want).abs().mean() < 0.03, "evaluation sees it upright"
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    x = reconstruct.load_image(path)
    assert x.shape == (1, 3, 96, 64), "reconstruct sees it upright"


def test_16_bit_png_is_scaled_not_white_in_evaluation_and_reconstruct(tmp_path):
    from dcae_train import reconstruct
    from dcae_train.evaluation.data import load_image

    gray8 = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (48, 1))  # a dark-to-bright ramp
    path16 = tmp_path / "ramp16.png"
    Image.fromarray(gray8.astype(np.uint16) * 257).save(path16)  # the same ramp in 16 bits
    assert Image.open(path16).mode.startswith("I")
    ref = torch.from_numpy(gray8.astype(np.float32) / 127.5 - 1.0)
    x = reconstruct.load_image(path16)
    assert (x[0, 0] - ref).abs().max() < 0.02, "reconstruct: not white"
    y = load_image(path16.read_bytes(), 32)
    assert y.min() < -0.5 and y.max() > 0.5, "evaluate: the ramp survives"
