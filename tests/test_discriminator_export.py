"""Shareable phase 3: `export --with-discriminator` writes the discriminator beside the autoencoder, and a new
phase-3 run started with `init_discriminator=` (or `init_from=` that folder alone) holds exactly those weights."""

from __future__ import annotations

import json

import pytest
import torch

from dcae_train import cli
from dcae_train.config import compose
from dcae_train.export import main as export_main
from dcae_train.schema import ConfigError
from dcae_train.training.run import build_run
from dcae_train.weights.io import WeightsError

SMOKE = ["debug=smoke", "data=demo", "data.num_workers=0", "phase=3", "phases.p3.loss.lpips_net=alex"]


@pytest.fixture(scope="module")
def phase3_ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p3")
    overrides = [
        f"runs_dir={tmp / 'runs'}",
        *SMOKE,
        "init_from=tiny",
        "phases.p3.loss.gan_start=0",
        "phases.p3.loss.lecam=0.1",
    ]
    assert cli.main(overrides) == 0
    (run,) = (tmp / "runs" / "quickstart" / "phase3").iterdir()
    return run / "checkpoints" / "final.ckpt"


def test_export_with_discriminator_then_continue_phase3_with_identical_weights(tmp_path, phase3_ckpt, capsys):
    out = tmp_path / "shared"
    assert export_main([str(phase3_ckpt), str(out), "--with-discriminator"]) == 0
    assert "init_discriminator=" in capsys.readouterr().out
    info = json.loads((out / "discriminator.json").read_text())
    assert (info["type"], info["layers"], info["width"]) == ("patch", 2, 32) and info["step"] == 2
    assert info["lecam"] is not None  # the LeCAM EMAs travel too
    ckpt = torch.load(phase3_ckpt, weights_only=True, map_location="cpu")["state_dict"]
    expected = {
        k.removeprefix("loss.discriminator."): v for k, v in ckpt.items() if k.startswith("loss.discriminator.")
    }

    cfg = compose(
        [
            f"runs_dir={tmp_path / 'runs'}",
            *SMOKE,
            "init_from=tiny",
            f"init_discriminator={out}",
            "phases.p3.loss.lecam=0.1",
        ]
    )
    run = build_run(cfg)
    got = run.module.loss.discriminator.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert run.module.loss.lecam.ema_real.item() == pytest.approx(float(ckpt["loss.lecam.ema_real"]))
    assert run.module.meta.discriminator["init_from"] == str(out)
    # init_from= the shared folder alone: the autoencoder and the discriminator both come from it
    cfg = compose([f"runs_dir={tmp_path / 'runs2'}", *SMOKE, f"init_from={out}", "phases.p3.loss.lecam=0.1"])
    run = build_run(cfg)
    got = run.module.loss.discriminator.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert run.module.meta.discriminator["init_from"] == str(out)
    ae = torch.load(phase3_ckpt, weights_only=True, map_location="cpu")["state_dict"]
    ema = {k.removeprefix("ema."): v for k, v in ae.items() if k.startswith("ema.")}  # export writes the EMA copy
    mine = run.module.model.state_dict()
    assert ema.keys() == mine.keys() and all(torch.equal(mine[k], ema[k]) for k in mine)
    # the autoencoder export itself holds no discriminator
    from safetensors import safe_open

    with safe_open(str(next(out.glob("diffusion_pytorch_model*.safetensors"))), "pt") as f:
        assert not any("discriminator" in k for k in f.keys())  # noqa: SIM118


def test_a_differently_shaped_discriminator_is_refused(tmp_path, phase3_ckpt):
    cfg = compose([f"runs_dir={tmp_path / 'runs'}", *SMOKE, "init_from=tiny", f"init_discriminator={phase3_ckpt}",
                   "phases.p3.loss.disc.width=16"])  # fmt: skip
    with pytest.raises(ValueError, match="width=32"):
        build_run(cfg)


def test_discriminator_export_errors_are_clear(tmp_path, capsys):
    assert export_main(["tiny", str(tmp_path / "x"), "--with-discriminator"]) == 2
    assert "phase-3 training checkpoint" in capsys.readouterr().err
    from dcae_train.weights.discriminator import read_discriminator

    with pytest.raises(WeightsError, match="--with-discriminator"):
        read_discriminator(tmp_path)
    with pytest.raises(ConfigError, match="no GAN"):
        from dcae_train.config import to_config

        to_config(compose([*SMOKE[:3], "phase=1", f"init_discriminator={tmp_path}"]))
