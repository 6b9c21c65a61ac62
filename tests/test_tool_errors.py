"""Ordinary user errors in the tools: one line naming the problem and the fix, exit 2, no traceback (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dcae_train import cost, encode_dataset, evaluate, export, latent_stats, reconstruct
from dcae_train.models import build_model
from dcae_train.weights import WeightsError, export_original, load_model

OFF = ["--lpips", "off", "--fid", "off", "--no-progress", "--num-workers", "0"]
TINY = ["--model", "tiny", "--random-init"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tool_errors")
    (root / "imgs").mkdir()
    (root / "empty").mkdir()
    for i in range(2):
        rgb = (np.random.default_rng(i).random((40, 40, 3)) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(root / "imgs" / f"{i}.png")
    (root / "afile").write_text("x")
    (root / "imgs.safetensors").mkdir()  # a folder with a weight file's name
    (root / "dangling").symlink_to(root / "gone")  # a link to nothing: mkdir would fail on it after the work
    torch.manual_seed(0)
    export_original(build_model("tiny"), root / "original")
    return root


CASES = [  # (tool, argv with {root}, text the message must hold)
    (evaluate, [*TINY, "--data", "{root}/nope", *OFF], "matches no files"),
    (evaluate, [*TINY, "--data", "{root}/empty", *OFF], "holds no images"),
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "0", *OFF], "give positive sizes"),
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "36", *OFF], "multiple of the model's spatial"),
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/afile", *OFF], "is a file"),
    (evaluate, ["--model", "./nope/model.ckpt", "--data", "{root}/imgs", *OFF], "no such file or folder: nope"),
    (latent_stats, [*TINY, "--data", "{root}/nope"], "matches no files"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--resolution", "-8"], "give positive sizes"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--resolution", "36", "--num-workers", "0"], "multiple of"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--out", "{root}/imgs"], "give a .json file path"),
    (latent_stats, ["--model", "runs/x/final.ckpt", "--data", "{root}/imgs"], "no such file or folder: runs/x"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--write-config", "{root}/original"], "original-layout"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/afile"], "is a file"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/r", "--overlap", "-8"], "--overlap"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "runs/a/b.ckpt", "--out", "{root}/r"], "no such file or folder"),
    (export, ["runs/x/final.ckpt", "{root}/e"], "no such file or folder: runs/x/final.ckpt"),
    (encode_dataset, ["--model", "./missing.safetensors", "--data", "{root}/imgs", "--out", "{root}/enc"],
     "no such file or folder: missing.safetensors"),
    # an output path that cannot be a folder: said before the model loads or the work starts
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/afile/e", *OFF],
     "--out {root}/afile/e: cannot write there (Not a directory"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/afile/x/s.json"],
     "the folder {root}/afile/x: cannot write there"),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--scaling-file", "{root}/afile/s.npy"],
     "--scaling-file {root}/afile/s.npy: the folder {root}/afile: is a file"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/afile/r"], "cannot write there"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/r", "--tile", "0"],
     "--tile 0: must be a positive multiple"),
    (export, ["tiny", "{root}/afile"], "out_dir {root}/afile: is a file"),
    (export, ["tiny", "{root}/afile/e"], "out_dir {root}/afile/e: cannot write there (Not a directory"),
    (export, ["tiny", "--format", "original", "{root}/afile/m.safetensors"], "the folder {root}/afile: is a file"),
    (export, ["tiny", "--format", "original", "{root}/imgs.safetensors"], "is a folder"),
    (encode_dataset, [*TINY, "--data", "{root}/imgs", "--out", "{root}/afile"], "--out {root}/afile: is a file"),
    (encode_dataset, [*TINY, "--data", "{root}/imgs", "--out", "{root}/afile/enc"], "cannot write there"),
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/dangling", *OFF],
     "--out {root}/dangling: cannot write there (Not a directory)"),
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/dangling/r"],
     "cannot write there (Not a directory at {root}/dangling)"),
    # every image skipped: an empty data set is not a success
    (encode_dataset, [*TINY, "--data", "{root}/imgs", "--out", "{root}/enc40", "--resolution", "64", "--no-progress",
                      "--num-workers", "0"], "no latent written: 2 image(s) read, all skipped {{'too_small': 2}}"),
    (cost, ["init_from=./missing"], "init_from=./missing: no such file or folder"),
    (cost, ["phase=3", "init_discriminator=runs/x/final.ckpt"], "init_discriminator=runs/x/final.ckpt: no such"),
]  # fmt: skip


@pytest.mark.parametrize(("tool", "argv", "message"), CASES, ids=[f"{t.__name__}-{i}" for i, (t, _, _) in
                                                                    enumerate(CASES)])  # fmt: skip
def test_user_errors_exit_2_with_one_clear_line(tool, argv, message, files, capsys, monkeypatch):
    monkeypatch.chdir(files)  # relative model paths are relative to here
    assert tool.main([a.format(root=files) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message.format(root=files) in err and "Traceback (most recent call last)" not in err


def test_a_missing_path_is_never_sent_to_the_hub(tmp_path, monkeypatch):
    """init_from= and --model share the loader: a path-like source that does not exist names the path."""
    from dcae_train.weights.loading import looks_like_path

    monkeypatch.chdir(tmp_path)
    for source in ["runs/quickstart/final.ckpt", "./exported", "~/nope-dcae", "weights.safetensors", "a/b/c"]:
        with pytest.raises(WeightsError, match="no such file or folder"):
            load_model(source)
    assert looks_like_path("../x") and not looks_like_path("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers")
    assert not looks_like_path("tiny")


def test_write_config_refuses_an_original_export_before_any_work(files):
    config = json.loads((files / "original" / "config.json").read_text())
    with pytest.raises(ValueError, match="--scaling-file"):
        latent_stats.parse_args([*TINY, "--data", str(files / "imgs"), "--write-config", str(files / "original")])
    assert json.loads((files / "original" / "config.json").read_text()) == config  # untouched


@contextmanager
def unprivileged():
    """Permission modes bind this process: as root (which ignores them, as on many CI machines and containers) the
    effective uid and gid become nobody's for the block."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def read_only(tmp_path_factory):
    """<dir>/ro: a folder nobody may write in, beside a readable image folder, in a tree others can enter."""
    root = Path(tempfile.mkdtemp(prefix="dcae-perm-"))
    (root / "imgs").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "imgs" / "0.png")
    (root / "ro").mkdir()
    for path in (root, root / "imgs", root / "imgs" / "0.png"):
        path.chmod(0o755)
    (root / "ro").chmod(0o555)
    yield root
    (root / "ro").chmod(0o755)
    shutil.rmtree(root)


PERMISSION_CASES = [
    (reconstruct, ["{root}/imgs/0.png", "--model", "tiny", "--out", "{root}/ro/r"]),
    (evaluate, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/ro/e", *OFF]),
    (latent_stats, [*TINY, "--data", "{root}/imgs", "--resolution", "32", "--out", "{root}/ro/x/s.json"]),
    (export, ["tiny", "{root}/ro/e"]),
    (encode_dataset, [*TINY, "--data", "{root}/imgs", "--out", "{root}/ro/enc", "--num-workers", "0"]),
]  # fmt: skip


@pytest.mark.parametrize(("tool", "argv"), PERMISSION_CASES, ids=[t.__name__ for t, _ in PERMISSION_CASES])
def test_an_output_folder_without_write_permission_is_refused_before_the_work(tool, argv, read_only, capsys):
    with unprivileged():
        code = tool.main([a.format(root=read_only) for a in argv])
    err = capsys.readouterr().err
    folder = read_only / "ro"  # named as the reason, not the probe's temporary file
    assert code == 2 and f"cannot write there (Permission denied at {folder})" in err and "Traceback" not in err, err
    assert os.listdir(read_only / "ro") == []
