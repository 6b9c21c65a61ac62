"""Chaos tests: kills mid-write, SIGTERM, NaN losses, corrupt checkpoints, bad configs, malicious pickles."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from _helpers_runs import fake_checkpoint

from dcae_train import cli
from dcae_train.training import checkpoint as ckpt_lib
from dcae_train.training.faults import EXIT_PREEMPTED, parse_faults
from dcae_train.weights import WeightsError
from dcae_train.weights.checkpoint import load_checkpoint

SMOKE = ["debug=smoke", "data=demo", "data.num_workers=0", "validate_at_start=false"]
BASE = ("phases.p1.max_steps=6", "phases.p1.ckpt_every=2", "phases.p1.log_every=1", "data.epoch_batches=2")


def run_sub(runs: Path, *overrides: str, faults: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.pop("DCAE_TRAIN_RESOLVED", None)
    if faults:
        env["DCAE_TRAIN_FAULTS"] = faults
    args = [sys.executable, "-m", "dcae_train", f"runs_dir={runs}", *SMOKE, *overrides]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def only_run(runs: Path, phase: int = 1) -> Path:
    (run,) = ckpt_lib.runs_newest_first(runs, "quickstart", phase)
    return run


def ckpt_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


# (a) SIGKILL during a checkpoint write ------------------------------------------------------------------
def test_kill_during_checkpoint_write_then_resume_auto(tmp_path):
    runs = tmp_path / "runs"
    killed = run_sub(runs, *BASE, faults="killwrite@3")  # the write at step 4 dies half-way
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run = only_run(runs)
    good = ckpt_lib.latest_good_checkpoint(run)
    assert good is not None and ckpt_step(good) == 2, "the step-2 checkpoint survived the crash"
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 2
    resumed = run_sub(runs, *BASE, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt_step(run / "checkpoints" / "final.ckpt") == 6


# (b) SIGTERM mid-run ------------------------------------------------------------------------------------
def test_sigterm_saves_exits_75_and_resume_continues(tmp_path):
    runs = tmp_path / "runs"
    term = run_sub(runs, *BASE, faults="sigterm@3")
    assert term.returncode == EXIT_PREEMPTED, term.stderr[-2000:]
    run = only_run(runs)
    assert ckpt_step(run / "checkpoints" / "last.ckpt") == 3, "saved at the step boundary after the signal"
    assert not (run / "FINISHED.json").exists()
    resumed = run_sub(runs, *BASE, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ckpt_step(run / "checkpoints" / "final.ckpt") == 6


# (c) NaN losses -----------------------------------------------------------------------------------------
def test_nan_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@2")
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE])
    assert code == 0
    run = only_run(tmp_path / "runs")
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert final["dcae"]["nonfinite_total"] == 1
    assert final["global_step"] == 6, "a skipped step is not an update: 6 good updates still happen"
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())


def test_nan_losses_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@3,nan@3,nan@3")  # three batches in a row at step 3
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE, "trainer.max_nonfinite_steps=3"])
    assert code == cli.EXIT_NONFINITE
    run = only_run(tmp_path / "runs")
    good = ckpt_lib.latest_good_checkpoint(run)
    assert good is not None and ckpt_step(good) == 2
    sd = torch.load(good, weights_only=True, map_location="cpu")["state_dict"]
    assert all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    assert not (run / "FINISHED.json").exists()


FUSED = ["phases.p1.optimizer.fused=true"]  # the CUDA default; CPU has the fused kernel too


def test_nan_loss_fused_optimizer_skips_on_device_without_sync(tmp_path, monkeypatch):
    """Fused AdamW: the non-finite step is skipped inside the kernel (found_inf), counted on the device and read
    back later; the step still counts in global_step, the weights stay finite."""
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@2")
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE, *FUSED])
    assert code == 0
    run = only_run(tmp_path / "runs")
    final = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert final["dcae"]["nonfinite_total"] == 1
    assert final["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in final["state_dict"].values() if v.is_floating_point())
    opt = final["optimizer_states"][0]["state"]
    assert all(int(st["step"]) == 5 for st in opt.values()), "the skipped step does not advance AdamW's step"


def test_nan_losses_in_a_row_stop_the_run_fused(tmp_path, monkeypatch):
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@2,nan@3,nan@4")
    args = [f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE, *FUSED, "trainer.max_nonfinite_steps=3"]
    assert cli.main(args) == cli.EXIT_NONFINITE
    run = only_run(tmp_path / "runs")
    assert not (run / "FINISHED.json").exists()


# (d) corrupt newest checkpoint ----------------------------------------------------------------------------
def test_corrupt_newest_checkpoint_falls_back(tmp_path):
    run = tmp_path / "runs" / "quickstart" / "phase1" / "20260101-000000-000000"
    folder = run / "checkpoints"
    fake_checkpoint(folder / "step00000002.ckpt", 2)
    newest = fake_checkpoint(folder / "step00000004.ckpt", 4)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated
    os.utime(newest, (newest.stat().st_mtime + 10,) * 2)
    assert not ckpt_lib.is_loadable(newest)
    assert ckpt_lib.find_resume_checkpoint(tmp_path / "runs", "quickstart", 1) == folder / "step00000002.ckpt"


def test_atomic_save_leaves_previous_file_on_failure(tmp_path):
    target = tmp_path / "last.ckpt"
    ckpt_lib.atomic_torch_save({"v": torch.zeros(2)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        ckpt_lib.atomic_torch_save({"v": Boom()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["v"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


# Bad configs: table-driven -------------------------------------------------------------------------------
BAD_CONFIGS = [
    (["phases.p1.resolution=100"], "phases.p1.resolution"),
    (["phase=2"], "phase=2"),  # no parent run and no init_from
    (["phases.p1.trainable=[decoder.nothing_here.*]"], "trainable"),
    (["phase=3", "init_from=tiny", "phases.p3.loss.gan=0"], "phases.p3.loss.gan"),
    (["phases.p1.batch_size=0"], "phases.p1.batch_size"),
    (["trainer.devices=0"], "trainer.devices"),
    (["data=webdataset", "data.train=/nonexistent/shard-{000000..000009}.tar", "data.val=/no/val.tar"], "data.train"),
    (["model.variant=dc-ae-f999"], "model.variant"),
    (["recipe=no-such-recipe"], "recipe"),
    (["phases.p1.optimizer.lrr=1"], "lrr"),
]


@pytest.mark.parametrize(("overrides", "names"), BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_bad_config_fails_before_training_naming_the_key(tmp_path, capsys, overrides, names):
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *overrides])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert names in err, err
    runs = tmp_path / "runs"
    assert not any(runs.rglob("*.ckpt")), "no training happened"


EARLY_CONFIGS = [
    (["trainer.devices=abc"], "trainer.devices='abc'"),
    (["trainer.devices='0,1'"], "trainer.devices='0,1': on the CPU"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu'"),
    (["trainer.strategy=foo"], "trainer.strategy='foo'"),
    (["seed=-1"], "seed=-1"),
    (["data.crop_scale=[0.5]"], "data.crop_scale=[0.5]"),
    (["data.warn_every_s=-1"], "data.warn_every_s=-1.0"),
    (["phases.p1.optimizer.grad_clip=-1"], "phases.p1.optimizer.grad_clip=-1.0"),
    (["phases.p1.optimizer.warmup_start_factor=-0.5"], "phases.p1.optimizer.warmup_start_factor=-0.5"),
    (["phases.p1.optimizer.betas=[0.9]"], "phases.p1.optimizer.betas=[0.9]"),
    (["phases.p1.ema.every=0"], "phases.p1.ema.every=0"),
    (["runs_dir={file}/runs"], "runs_dir='{file}/runs': cannot create or write the run folder"),
    (["run_dir={file}/run"], "run_dir='{file}/run': cannot create or write the run folder"),
]


@pytest.mark.parametrize(("overrides", "message"), EARLY_CONFIGS, ids=[m.split(":")[0] for _, m in EARLY_CONFIGS])
def test_bad_value_fails_before_the_model_is_built(tmp_path, capsys, monkeypatch, overrides, message):
    from dcae_train.training import run as run_lib

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")

    monkeypatch.setattr(run_lib, "build_run_model", no_model)
    a_file = tmp_path / "a-file"  # a path below a regular file cannot be created, also for root
    a_file.write_text("")
    args = [o.format(file=a_file) for o in overrides]
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *args])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert message.format(file=a_file) in err, err
    assert "Traceback" not in err, err


# Untrusted files --------------------------------------------------------------------------------------
class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.marker}",))


def _malicious_checkpoint(path: Path, marker: Path) -> None:
    _Exploit.marker = marker
    torch.save({"state_dict": {}, "payload": _Exploit()}, path)


def test_malicious_checkpoint_is_refused_by_every_loader(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "runs" / "quickstart" / "phase1" / "20260101-000000-000000" / "checkpoints" / "last.ckpt"
    evil.parent.mkdir(parents=True)
    _malicious_checkpoint(evil, marker)
    with pytest.raises(WeightsError, match="weights_only"):
        load_checkpoint(evil)
    with pytest.raises(WeightsError):
        ckpt_lib.AtomicCheckpointIO().load_checkpoint(evil)
    from dcae_train.weights import load_model

    with pytest.raises(Exception):  # noqa: B017  (any refusal; what matters is that no code ran)
        load_model(str(evil))
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, "phase=2", "model.variant=tiny", f"init_from={evil}"])
    assert code != 0
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, f"resume={evil}"])
    assert code != 0
    assert not marker.exists(), "unpickling ran code"
    assert zipfile.is_zipfile(evil) and pickle  # the file really is a torch checkpoint


def test_fault_spec_parsing():
    assert parse_faults("nan@3,kill@6,nan@3") == {3: ["nan", "nan"], 6: ["kill"]}
    with pytest.raises(ValueError, match="DCAE_TRAIN_FAULTS"):
        parse_faults("explode@1")


# Non-finite weights and the non-finite stop ------------------------------------------------------------------
def test_init_from_weights_with_nan_or_inf_are_refused_naming_the_tensors(tmp_path, capsys):
    from dcae_train.models import build_model
    from dcae_train.weights import export_diffusers

    model = build_model("tiny")
    with torch.no_grad():
        model.decoder.conv_out.weight[0, 0, 0, 0] = float("nan")
        model.encoder.conv_in.bias[0] = float("inf")
    folder = export_diffusers(model, tmp_path / "diverged")
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, f"init_from={folder}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert "2 tensor(s) hold NaN or Inf" in err and "decoder.conv_out.weight (1 of" in err, err
    assert "encoder.conv_in.bias" in err
    assert not any((tmp_path / "runs").rglob("*.ckpt"))


def test_nonfinite_stop_before_the_first_checkpoint_promises_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@1,nan@1,nan@1")
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE, "trainer.max_nonfinite_steps=3"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_NONFINITE
    assert "No checkpoint was written before the stop" in err, err
    assert "intact" not in err


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_file_mode_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        ckpt_lib.atomic_torch_save({"v": torch.zeros(2)}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_metrics_during_a_nonfinite_streak_log_skipped_steps_at_the_true_step(tmp_path, monkeypatch):
    """Two skipped batches at step 2: today the loss, grad_norm and lr of the last good step are logged again and
    the step column runs ahead of the real step."""
    import csv

    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "nan@3,nan@3")
    assert cli.main([f"runs_dir={tmp_path / 'runs'}", *SMOKE, *BASE]) == 0
    with open(only_run(tmp_path / "runs") / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    losses = [(int(r["step"]), r["train/loss_total"]) for r in rows if r.get("train/loss_total")]
    assert [s for s, _ in losses] == list(range(6)), losses  # one row per update, at its own step
    assert len({v for _, v in losses}) == 6, "no loss is repeated"
    skipped = [int(r["step"]) for r in rows if r.get("train/skipped")]
    assert skipped == [2, 2], skipped
    assert all(not r.get("train/loss_total") and not r.get("train/lr") for r in rows if r.get("train/skipped"))
