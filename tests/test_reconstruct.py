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


def test_reconstruct_skips_unreadable_files_and_never_overwrites_outputs(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for folder in ("a", "b"):  # two inputs named x
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(tmp_path / folder / "x.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    inputs = [str(tmp_path / "a" / "x.png"), str(tmp_path / "broken.jpg"), str(tmp_path / "b" / "x.png")]
    out = tmp_path / "out"
    assert main([*inputs, "--model", "tiny", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "1 of 3 image(s) skipped" in captured.err
    assert (out / "x_recon.png").is_file() and (out / "x-2_recon.png").is_file()
    assert not np.array_equal(
        np.asarray(Image.open(out / "x_recon.png")), np.asarray(Image.open(out / "x-2_recon.png"))
    )


def test_reconstruct_bad_out_and_overlap_are_clear_errors(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert main([str(tmp_path / "x.png"), "--model", "tiny", "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().err
    assert main([str(tmp_path / "x.png"), "--model", "tiny", "--out", str(tmp_path / "o"), "--overlap", "-4"]) == 2
    assert "--overlap" in capsys.readouterr().err
