"""Resume: the right checkpoint (by stored step), said out loud, in the same files, and only of the same run."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from _helpers_runs import fake_checkpoint

from dcae_train import cli
from dcae_train.training import checkpoint as ckpt_lib

QUICK = ["debug=smoke", "data=demo", "data.num_workers=0", "validate_at_start=false"]
BASE = ["phases.p1.max_steps=6", "phases.p1.ckpt_every=2", "phases.p1.log_every=1", "data.epoch_batches=2"]
RUN = Path("quickstart") / "phase1" / "20260101-000000-000000"


def test_resume_picks_the_highest_stored_step_not_the_newest_file(tmp_path):
    folder = tmp_path / RUN / "checkpoints"
    fake_checkpoint(folder / "step00000002.ckpt", 2)
    fake_checkpoint(folder / "step00000004.ckpt", 4)
    fake_checkpoint(folder / "last.ckpt", 4)
    old = folder / "step00000002.ckpt"
    os.utime(old, (old.stat().st_mtime + 100,) * 2)  # `touch`, or a copy without -t: the old file looks newest
    assert ckpt_lib.find_resume_checkpoint(tmp_path, "quickstart", 1) == folder / "last.ckpt"


def test_resume_skips_files_that_are_not_our_checkpoints(tmp_path, caplog):
    folder = tmp_path / RUN / "checkpoints"
    fake_checkpoint(folder / "step00000004.ckpt", 4)
    torch.save({"weights": torch.zeros(2)}, folder / "step00000009.ckpt")  # a torch file, but not ours
    (folder / "notes.ckpt").write_text("not a checkpoint")
    with caplog.at_level(logging.WARNING):
        assert ckpt_lib.find_resume_checkpoint(tmp_path, "quickstart", 1) == folder / "step00000004.ckpt"
    assert "step00000009.ckpt is not a readable dcae-train training checkpoint" in caplog.text
    assert "notes.ckpt" in caplog.text


def test_resume_says_what_it_resumes_keeps_last_ckpt_and_removes_orphans(tmp_path, monkeypatch, capsys):
    runs = tmp_path / "runs"
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "sigterm@3")
    assert cli.main([f"runs_dir={runs}", *QUICK, *BASE]) == cli.EXIT_PREEMPTED
    monkeypatch.delenv("DCAE_TRAIN_FAULTS")
    (run,) = ckpt_lib.runs_newest_first(runs, "quickstart", 1)
    orphan = run / "checkpoints" / ".step00000004.ckpt.k1ll3d.tmp"  # a write killed before its rename
    orphan.write_bytes(b"PK\x03\x04 partial")
    capsys.readouterr()
    assert cli.main([f"runs_dir={runs}", *QUICK, *BASE, "resume=auto"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run / 'checkpoints' / 'last.ckpt'} at step 3\n" in out, out
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in names and not [n for n in names if n.startswith("last-v")], names
    assert not orphan.exists()


MISMATCHES = [
    ({"recipe": "dc-ae-f32c32-sana-1.1"}, "recipe=dc-ae-f32c32-sana-1.1 in the checkpoint, quickstart in this run"),
    ({"phase": 2}, "phase=2 in the checkpoint, 1 in this run"),
    ({"variant": "tiny-in"}, "model.variant=tiny-in in the checkpoint, tiny in this run"),
    ({"trainable": ["decoder.*"]}, "phases.p1.trainable=['decoder.*'] in the checkpoint, ['*'] in this run"),
]


@pytest.mark.parametrize(("meta", "message"), MISMATCHES, ids=[next(iter(m)) for m, _ in MISMATCHES])
def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, capsys, meta, message):
    ckpt = fake_checkpoint(tmp_path / "elsewhere" / "run" / "checkpoints" / "last.ckpt", 4, **meta)
    code = cli.main([f"runs_dir={tmp_path / 'runs'}", *QUICK, f"resume={ckpt}"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert message in err, err
    assert not (tmp_path / "elsewhere" / "run" / "config.yaml").exists(), "nothing written into the other run"


def test_resume_auto_continues_the_newest_run_never_an_older_finished_one(tmp_path, capsys):
    runs = tmp_path / "runs"
    finished = tmp_path / "runs" / RUN  # an older, finished run: its final.ckpt is the parent of phase 2
    final = fake_checkpoint(finished / "checkpoints" / "final.ckpt", 2)
    ckpt_lib.write_finished(finished, final, {"recipe": "quickstart", "phase": 1, "step": 2})
    before = final.read_bytes()
    newest = runs / "quickstart" / "phase1" / "20260102-000000-000000"  # preempted before its first checkpoint
    newest.mkdir(parents=True)
    assert cli.main([f"runs_dir={runs}", *QUICK, "resume=auto"]) == 0, capsys.readouterr().err
    assert final.read_bytes() == before, "the finished run was not touched"
    assert ckpt_lib.stored_step(newest / "checkpoints" / "final.ckpt") == 2, "the newest run trained from step 0"


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, capsys):
    """Killed after the last step's checkpoint, before final.ckpt: Lightning skips the whole fit loop (and its
    on_train_end) on resume; the run must still end with final.ckpt and FINISHED.json, or phase 2 has no parent."""
    runs = tmp_path / "runs"
    steps = ["phases.p1.max_steps=2", "phases.p1.ckpt_every=1"]
    assert cli.main([f"runs_dir={runs}", *QUICK, *steps]) == 0, capsys.readouterr().err
    run = next((runs / "quickstart" / "phase1").iterdir())
    reference = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    (run / "checkpoints" / "final.ckpt").unlink()  # as if killed between step 2's checkpoint and the final one
    (run / ckpt_lib.FINISHED).unlink()
    assert cli.main([f"runs_dir={runs}", *QUICK, *steps, "resume=auto"]) == 0, capsys.readouterr().err
    assert ckpt_lib.stored_step(run / "checkpoints" / "final.ckpt") == 2
    weights = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in reference)
    assert ckpt_lib.find_parent_checkpoint(runs, "quickstart", 2) == run / "checkpoints" / "final.ckpt"


def test_moved_runs_folder_chains_phases_to_its_own_files(tmp_path):
    original = tmp_path / "runs"
    final = fake_checkpoint(original / RUN / "checkpoints" / "final.ckpt", 2)
    ckpt_lib.write_finished(original / RUN, final, {"recipe": "quickstart", "phase": 1, "step": 2})
    assert json.loads((original / RUN / "FINISHED.json").read_text())["checkpoint"] == "checkpoints/final.ckpt"
    copy = tmp_path / "elsewhere" / "runs"
    shutil.copytree(original, copy)
    assert ckpt_lib.find_parent_checkpoint(copy, "quickstart", 2) == copy / RUN / "checkpoints" / "final.ckpt"
    shutil.rmtree(original)  # moved, not copied: still found
    assert ckpt_lib.find_parent_checkpoint(copy, "quickstart", 2) == copy / RUN / "checkpoints" / "final.ckpt"


EXACT = [
    "phases.p1.max_steps=8",
    "phases.p1.ckpt_every=100",
    "phases.p1.log_every=1",
    "phases.p1.val_every=100",
    "phases.p1.image_every=100",
    "data.epoch_batches=4",
    "trainer.deterministic=true",
]


def losses(run: Path) -> list[tuple[int, float]]:
    with open(run / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r["train/loss_total"])) for r in csv.DictReader(f) if r.get("train/loss_total")]


def test_mid_epoch_resume_is_exact_and_metrics_keep_their_history(tmp_path, monkeypatch):
    """Preempted at step 6, two batches into the second epoch: the resumed run sees the same batches as an
    uninterrupted one (the stream position is in the checkpoint), and metrics.csv keeps the rows from before."""
    ref_runs, cut_runs = tmp_path / "ref", tmp_path / "cut"
    assert cli.main([f"runs_dir={ref_runs}", *QUICK, *EXACT]) == 0
    monkeypatch.setenv("DCAE_TRAIN_FAULTS", "sigterm@6")
    assert cli.main([f"runs_dir={cut_runs}", *QUICK, *EXACT]) == cli.EXIT_PREEMPTED
    monkeypatch.delenv("DCAE_TRAIN_FAULTS")
    (cut,) = ckpt_lib.runs_newest_first(cut_runs, "quickstart", 1)
    assert ckpt_lib.stored_step(cut / "checkpoints" / "last.ckpt") == 6
    assert cli.main([f"runs_dir={cut_runs}", *QUICK, *EXACT, "resume=auto"]) == 0
    (ref,) = ckpt_lib.runs_newest_first(ref_runs, "quickstart", 1)
    got, want = losses(cut), losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(8)), got
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6, abs=1e-7)
