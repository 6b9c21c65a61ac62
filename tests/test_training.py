"""The training recipe end to end on the tiny variants: composition, phases, freezing, GAN gating, resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dcae_train import cli
from dcae_train.config import compose as compose_config
from dcae_train.config import recipe_names, to_config
from dcae_train.training.run import build_run

RECIPES = recipe_names()
SMOKE = ["debug=smoke", "data=demo", "data.num_workers=0"]


def compose(tmp_path: Path, *overrides: str):
    return compose_config([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides])


def run_cli(tmp_path: Path, *overrides: str) -> int:
    return cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides])


def run_dirs(tmp_path: Path, recipe: str, phase: int) -> list[Path]:
    root = tmp_path / "runs" / recipe / f"phase{phase}"
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def step_values(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


# Composition --------------------------------------------------------------------------------------------
def test_recipes_exist_for_every_released_variant():
    from dcae_train.models import VARIANTS

    released = [v for v in VARIANTS if v.startswith("dc-ae")]
    assert set(released) <= set(RECIPES), set(released) - set(RECIPES)
    assert "quickstart" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("phase", [1, 2, 3])
def test_every_recipe_and_phase_composes_and_validates(tmp_path, recipe, phase):
    cfg = to_config(compose(tmp_path, f"recipe={recipe}", f"phase={phase}"))  # every rule of every part checked
    assert cfg.recipe == recipe and cfg.phase_config is getattr(cfg.phases, f"p{phase}")


@pytest.mark.parametrize("recipe", [r for r in RECIPES if not r.startswith("quickstart")])
def test_released_recipe_models_build_full_size_on_meta(tmp_path, recipe):
    from dcae_train.models import build_model

    cfg = to_config(compose_config([f"recipe={recipe}", "data=demo"]))
    with torch.device("meta"):
        model = build_model(cfg.model.variant)
    assert sum(p.numel() for p in model.parameters()) > 300e6
    ratio = model.spatial_compression_ratio
    for p in (cfg.phases.p1, cfg.phases.p2, cfg.phases.p3):
        assert p.resolution % ratio == 0


def test_default_is_quickstart_phase1(tmp_path):
    cfg = to_config(compose_config([]))
    assert (cfg.recipe, cfg.phase, cfg.model.variant) == ("quickstart", 1, "tiny")


def test_released_recipe_without_data_names_the_missing_key(tmp_path, capsys):
    assert cli.main([f"runs_dir={tmp_path}", "recipe=dc-ae-f32c32-in-1.0"]) == cli.EXIT_CONFIG
    assert "data.train is required" in capsys.readouterr().err


def test_unknown_key_and_recipe_fail_clearly():
    with pytest.raises(ValueError, match="lrr"):
        compose_config(["phases.p1.optimizer.lrr=1"])
    with pytest.raises(ValueError, match="not a recipe"):
        compose_config(["recipe=nope"])
    assert cli.main(["phases.p1.optimizer.lrr=1"]) == cli.EXIT_CONFIG


# One step of every recipe ------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_phase1_takes_a_step_with_tiny(tmp_path, recipe):
    assert run_cli(tmp_path, f"recipe={recipe}", "phases.p1.max_steps=1") == 0
    (run,) = run_dirs(tmp_path, recipe, 1)
    assert (run / "checkpoints" / "final.ckpt").is_file()
    assert json.loads((run / "FINISHED.json").read_text())["step"] == 1


# The three phases chained ------------------------------------------------------------------------------
def test_quickstart_three_phases_chain_and_export(tmp_path):
    for phase in (1, 2, 3):
        assert run_cli(tmp_path, f"phase={phase}") == 0
    p1, p2, p3 = (run_dirs(tmp_path, "quickstart", n)[0] for n in (1, 2, 3))
    ckpt = torch.load(p3 / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["dcae"]["phase"] == 3
    assert Path(ckpt["dcae"]["parent"]).parent.parent == p2
    assert any(k.startswith("ema.") for k in ckpt["state_dict"])
    assert not any(k.startswith("loss.perceptual") for k in ckpt["state_dict"])
    assert list((p3 / "images").glob("*.png")), "reconstruction grids are written"
    assert (p3 / "metrics.csv").is_file() and (p3 / "loss_curves.png").is_file()
    assert json.loads((p1 / "run.json").read_text())["lpips_pretrained"] is False

    from dcae_train.weights import export_diffusers, load_model

    model = load_model(str(p3 / "checkpoints" / "final.ckpt"))
    out = tmp_path / "exported"
    export_diffusers(model, out)
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors"))


def test_phase2_without_parent_fails_before_work(tmp_path):
    assert run_cli(tmp_path, "phase=2") == cli.EXIT_CONFIG
    assert not run_dirs(tmp_path, "quickstart", 2)


# Freezing ---------------------------------------------------------------------------------------------
def _fit_and_compare(tmp_path, phase: int, variant: str):
    cfg = compose(
        tmp_path,
        f"phase={phase}",
        f"model.variant={variant}",
        f"init_from={variant}",
        f"phases.p{phase}.max_steps=3",
        "validate_at_start=false",
    )
    run = build_run(cfg)
    before = {k: v.detach().clone() for k, v in run.module.model.state_dict().items()}
    run.trainer.fit(run.module, datamodule=run.datamodule)
    after = run.module.model.state_dict()
    trainable = set(run.module.trainable_names)
    return before, after, trainable


@pytest.mark.parametrize("phase", [2, 3])
def test_frozen_parameters_and_batchnorm_statistics_do_not_move(tmp_path, phase):
    before, after, trainable = _fit_and_compare(tmp_path, phase, "tiny-in")
    assert trainable, "something trains"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the selected parameters train"
    assert changed <= trainable, f"frozen tensors changed: {sorted(changed - trainable)[:5]}"
    bn_stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn_stats, "tiny-in has BatchNorm decoder stages"
    for k in bn_stats:
        assert torch.equal(before[k], after[k]), k


# GAN gating and step counting ---------------------------------------------------------------------------
def test_adversarial_term_absent_before_gan_start_and_max_steps_counts_batches(tmp_path):
    assert (
        run_cli(
            tmp_path,
            "phase=3",
            "init_from=tiny",
            "phases.p3.max_steps=5",
            "phases.p3.loss.gan_start=3",
            "phases.p3.loss.disc_start=0",
            "phases.p3.log_every=1",
        )
        == 0
    )
    (run,) = run_dirs(tmp_path, "quickstart", 3)
    rows = read_metrics(run)
    gan = step_values(rows, "train/loss_gan")
    total = step_values(rows, "train/loss_total")
    assert sorted(total) == [0, 1, 2, 3, 4], "max_steps=5 ran exactly 5 batches (logged at steps 0..4)"
    assert all(s >= 3 for s in gan), f"adversarial term logged before gan_start: {gan}"
    assert any(s >= 3 for s in gan), "adversarial term present from gan_start"
    assert json.loads((run / "FINISHED.json").read_text())["step"] == 5
    assert step_values(rows, "train/loss_disc"), "the discriminator trains from disc_start=0"


# Resume -------------------------------------------------------------------------------------------------
def _subprocess(tmp_path: Path, *overrides: str, faults: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONHASHSEED": "0"}
    env.pop("DCAE_TRAIN_RESOLVED", None)
    if faults:
        env["DCAE_TRAIN_FAULTS"] = faults
    args = [sys.executable, "-m", "dcae_train", f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


RESUME_ARGS = (
    "phases.p1.max_steps=8",
    "phases.p1.ckpt_every=4",
    "phases.p1.log_every=1",
    "phases.p1.val_every=100",
    "phases.p1.image_every=100",
    "data.epoch_batches=4",
    "trainer.deterministic=true",
    "validate_at_start=false",
)


def test_killed_run_resumes_with_identical_losses(tmp_path):
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    assert _subprocess(ref_dir, *RESUME_ARGS).returncode == 0
    killed = _subprocess(cut_dir, *RESUME_ARGS, faults="kill@6")
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _subprocess(cut_dir, *RESUME_ARGS, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (ref_run,) = run_dirs(ref_dir, "quickstart", 1)
    (cut_run,) = run_dirs(cut_dir, "quickstart", 1)
    ref = step_values(read_metrics(ref_run), "train/loss_total")
    cut = step_values(read_metrics(cut_run), "train/loss_total")
    for step in (4, 5, 6, 7):
        assert cut[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, cut[step], ref[step])
    logged = [int(r["step"]) for r in read_metrics(cut_run) if r.get("train/loss_total")]
    assert logged == list(range(8)), "history kept; the rows of the killed segment (steps 4, 5) logged once"


# DDP ----------------------------------------------------------------------------------------------------
DDP = ("trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "validate_at_start=false")


def test_ddp_two_processes_phase1_and_phase3(tmp_path):
    p1 = _subprocess(tmp_path, *DDP, "phases.p1.max_steps=2")
    assert p1.returncode == 0, p1.stderr[-3000:]
    (run1,) = run_dirs(tmp_path, "quickstart", 1)
    parent = f"init_from={run1 / 'checkpoints' / 'final.ckpt'}"
    p3 = _subprocess(tmp_path, *DDP, "phase=3", parent, "phases.p3.max_steps=2", "phases.p3.loss.gan_start=1")
    assert p3.returncode == 0, p3.stderr[-3000:]
    (run3,) = run_dirs(tmp_path, "quickstart", 3)
    final = torch.load(run3 / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert final["global_step"] == 2 and final["dcae"]["parent"].startswith(str(run1))
    assert any(k.startswith("loss.discriminator.") for k in final["state_dict"])
