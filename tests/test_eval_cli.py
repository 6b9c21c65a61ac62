"""End-to-end: `python -m dcae_train.evaluate` on a tiny model, demo shards and an image folder (issue 6)."""

from __future__ import annotations

import json
import math
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from dcae_train.evaluate import main
from dcae_train.evaluation.data import adm_center_crop, eval_loader, resolve_data
from dcae_train.latent_stats import run as latent_main

TEST_FLAGS = ["--lpips", "random", "--fid", "tiny", "--num-workers", "0", "--no-progress", "--resolution", "64"]


@pytest.fixture(scope="module")
def demo_val(tmp_path_factory):
    from dcae_train.data.demo import demo_shards

    return demo_shards(tmp_path_factory.mktemp("demo"))["val"]


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, (w, h) in enumerate([(96, 80), (150, 64), (64, 200), (300, 260), (70, 70)]):
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / ("sub" if i % 2 else "") / f"img{i}.png")
    return root


def _finite_report(out, expect_images):
    result = json.loads((out / "eval.json").read_text())
    m = result["metrics"]
    assert m["num_images"] == expect_images
    for key in ("psnr", "ssim", "lpips", "rfid"):
        assert math.isfinite(m[key]), key
    for key in ("mean", "std", "rms", "scaling_factor"):
        assert math.isfinite(result["latent"][key]), key
    assert "| PSNR |" in (out / "eval.md").read_text().replace(" PSNR ", " PSNR ")
    assert (out / "worst.png").stat().st_size > 0
    return result


def test_evaluate_demo_shards(demo_val, tmp_path):
    out = tmp_path / "eval"
    flags = ["--model", "tiny", "--random-init", "--data", demo_val, "--batch-size", "8", "--num-images", "16"]
    main([*flags, *TEST_FLAGS, "--stats-cache", str(tmp_path / "cache"), "--out", str(out)])
    first = _finite_report(out, 16)
    assert first["reference_stats"]["cached"] is False
    main([*flags, *TEST_FLAGS, "--stats-cache", str(tmp_path / "cache"), "--out", str(out)])
    second = _finite_report(out, 16)
    assert second["reference_stats"]["cached"] is True  # reals are not re-extracted
    assert abs(second["metrics"]["rfid"] - first["metrics"]["rfid"]) < 1e-6
    assert len(second["worst"]) == 8 and second["worst"][0]["psnr"] <= second["worst"][-1]["psnr"]


def test_evaluate_image_folder(image_folder, tmp_path):
    out = tmp_path / "eval"
    main(["--model", "tiny-in", "--random-init", "--data", str(image_folder), "--batch-size", "2", *TEST_FLAGS,
          "--stats-cache", str(tmp_path / "cache"), "--out", str(out)])  # fmt: skip
    _finite_report(out, 5)


def test_missing_inception_fails_before_the_model(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    assert (
        main(["--model", "no-such-model", "--data", str(image_folder), "--lpips", "random", "--out", str(tmp_path)])
        == 2
    )
    assert re.search(r"pt_inception-2015-12-05-6726825d\.pth.*hub/checkpoints", capsys.readouterr().err)


def test_bad_inputs_are_named(image_folder, tmp_path, capsys):
    out = ["--out", str(tmp_path / "eval")]
    model = ["--model", "tiny", "--random-init"]
    for argv, message in [
        ([*model, "--data", str(image_folder), *TEST_FLAGS[:-2], "--resolution", "36"],
         "--resolution=36 must be a multiple of the model's spatial compression 8"),
        ([*model, "--data", str(tmp_path / "nope*.tar"), *TEST_FLAGS, *out], "matches no files"),
        (["--model", "foo", "--random-init", "--data", str(image_folder), *TEST_FLAGS, *out], "variant name"),
    ]:  # fmt: skip
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()  # nothing written for bad input


def test_adm_center_crop_sizes_and_content():
    arr = np.zeros((300, 1000, 3), np.uint8)
    arr[:, 450:550] = 255  # a white bar in the centre survives the crop
    out = adm_center_crop(Image.fromarray(arr), 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[:, 32].min() > 200 and np.asarray(out)[:, 0].max() < 30
    assert adm_center_crop(Image.fromarray(arr[:50, :40]), 64).size == (64, 64)  # small images are upsampled


def test_a_resolution_below_one_pixel_is_an_error_not_an_endless_loop(image_folder):
    """The BOX-halving loop never ended on a resolution <= 0 (a DataLoader worker spun at 100% CPU)."""
    outcome: list = []

    def crop() -> None:
        try:
            adm_center_crop(Image.new("RGB", (40, 40)), -8)
        except ValueError as err:
            outcome.append(err)

    worker = threading.Thread(target=crop, daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive() and outcome and "at least one pixel" in str(outcome[0])
    with pytest.raises(ValueError, match="resolution=0: give a positive"):
        eval_loader(resolve_data(str(image_folder)), 0, batch_size=2, num_workers=2)


def test_folder_split_across_ranks_is_disjoint_and_complete(image_folder):
    data = resolve_data(str(image_folder))
    keys = [k for r in range(2) for b in eval_loader(data, 64, 2, 0, rank=r, world_size=2) for k in b["__key__"]]
    assert sorted(keys) == sorted(str(f.relative_to(image_folder)) for f in data.files)
    batch = next(iter(eval_loader(data, 64, 2, 0)))
    assert batch["image"].shape == (2, 3, 64, 64) and batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["image"].dtype == torch.float32


def test_num_images_0_means_all(image_folder, tmp_path):
    """Today `--num-images 0` is refused as too few images for FID."""
    out = tmp_path / "eval"
    main(["--model", "tiny-in", "--random-init", "--data", str(image_folder), "--batch-size", "2", *TEST_FLAGS,
          "--num-images", "0", "--stats-cache", str(tmp_path / "cache"), "--out", str(out)])  # fmt: skip
    _finite_report(out, 5)


def test_a_corrupt_image_or_bomb_is_skipped_and_counted_not_fatal(image_folder, tmp_path):
    from _helpers_data import png_bomb

    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg at all")
    (image_folder / "bomb.png").write_bytes(png_bomb())
    out = tmp_path / "eval"
    main(["--model", "tiny-in", "--random-init", "--data", str(image_folder), "--batch-size", "2", *TEST_FLAGS,
          "--stats-cache", str(tmp_path / "cache"), "--out", str(out)])  # fmt: skip
    result = _finite_report(out, 5)
    assert result["skipped_images"] == 2
    stats = latent_main(["--model", "tiny", "--random-init", "--data", str(image_folder), "--resolution", "32",
                         "--num-workers", "0", "--no-progress", "--out", str(tmp_path / "s.json")])  # fmt: skip
    assert stats["num_images_this_rank"] == 5 and stats["skipped_images_this_rank"] == 2
