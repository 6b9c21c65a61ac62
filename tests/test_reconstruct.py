"""`python -m dcae_train.reconstruct`: any image size, reconstruction + side-by-side PNG + PSNR."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dcae_train.reconstruct import main


def test_reconstruct_odd_sized_images_with_tiling(tmp_path, capsys):
    rng = np.random.default_rng(0)
    paths = []
    for name, (w, h) in {"a.png": (70, 45), "b.jpg": (33, 100)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    out = tmp_path / "out"
    assert main([*paths, "--model", "tiny", "--out", str(out), "--tile", "32", "--overlap", "8"]) == 0
    table = capsys.readouterr().out
    assert "a.png" in table and "PSNR" in table
    assert Image.open(out / "a_recon.png").size == (70, 45)
    compare = Image.open(out / "b_compare.png")
    assert compare.size[0] == 2 * 33 and compare.size[1] > 100


def test_reconstruct_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing.png"), "--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert main([str(tmp_path / "x.png"), "--model", "tiny", "--out", str(tmp_path), "--tile", "30"]) == 2
