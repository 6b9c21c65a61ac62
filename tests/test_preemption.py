"""Preemption as clusters deliver it: signals to the whole process group (SLURM, systemd, `timeout`,
`kill -- -PGID`), Ctrl-C once and twice, and a signal before the first step. Every run here is a subprocess in
its own session, so a group signal reaches its DataLoader workers and never the test runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dcae_train import cli
from dcae_train.data.webdataset import SignalProofDataLoader
from dcae_train.training.faults import EXIT_PREEMPTED

# Two workers, so the group signal has workers to hit; long enough that it is still running when signalled.
LONG = [
    "debug=smoke",
    "data=demo",
    "data.num_workers=2",
    "validate_at_start=false",
    "phases.p1.max_steps=100000",
    "phases.p1.ckpt_every=1",
    "phases.p1.keep_checkpoints=1",
    "phases.p1.val_every=100000",
    "phases.p1.image_every=100000",
    "data.epoch_batches=100000",
]


def start(runs: Path, *overrides: str, faults: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("DCAE_TRAIN_RESOLVED", None)
    env.pop("DCAE_TRAIN_FAULTS", None)
    if faults:
        env["DCAE_TRAIN_FAULTS"] = faults
    args = [sys.executable, "-m", "dcae_train", f"runs_dir={runs}", *overrides]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def wait_for_training(runs: Path, proc: subprocess.Popen, timeout: float = 120) -> Path:
    """The run folder, once the first step's checkpoint exists (so the loop and its workers are running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(runs.glob("quickstart/phase1/*/checkpoints/step*.ckpt"))
        if found:
            return found[0].parent.parent
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("training did not start")


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, out


def step_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True, map_location="cpu")["global_step"])


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGINT, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)], ids=lambda s: s.name
)
def test_group_signal_checkpoints_and_exits_75(tmp_path, sig):
    runs = tmp_path / "runs"
    proc = start(runs, *LONG)
    run = wait_for_training(runs, proc)
    os.killpg(proc.pid, sig)  # the main process and both DataLoader workers
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "killed by signal" not in out and "Traceback" not in out, out[-3000:]
    (preempt,) = (run / "checkpoints").glob("preempt-step*.ckpt")
    assert step_of(preempt) >= 1 and step_of(run / "checkpoints" / "last.ckpt") == step_of(preempt)
    assert not (run / "FINISHED.json").exists()


def test_second_ctrl_c_aborts_at_once(tmp_path):
    runs = tmp_path / "runs"
    proc = start(runs, *LONG, "phases.p1.max_steps=6", faults="sigint@3,sigint@3")  # two Ctrl-C in step 3
    code, out = finish(proc)
    assert code == 130, out[-3000:]
    assert "aborted by a second Ctrl-C" in out
    assert not list(runs.rglob("preempt-step*.ckpt")), "the second Ctrl-C does not wait for a checkpoint"


def test_signal_during_startup_validation_exits_75(tmp_path):
    """Today: Lightning's SIGTERM exception ends the validation and the process exits 0 with nothing trained."""
    runs = tmp_path / "runs"
    proc = start(runs, *LONG, "validate_at_start=true", "phases.p1.val_batches=4", faults="sigterm@0")
    code, out = finish(proc)
    assert code == EXIT_PREEMPTED, out[-3000:]
    assert "start-up validation" in out
    assert not list(runs.rglob("*.ckpt")), "nothing was trained, so nothing was saved"


# One writer per run folder -------------------------------------------------------------------------------
QUICK = ["debug=smoke", "data=demo", "data.num_workers=0", "validate_at_start=false"]


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, capsys, caplog):
    runs = tmp_path / "runs"
    proc = start(runs, *LONG)
    run = wait_for_training(runs, proc)
    try:
        code = cli.main([f"runs_dir={runs}", *QUICK, "resume=auto"])  # would attach to the live run
        err = capsys.readouterr().err
        assert code == cli.EXIT_CONFIG, err
        assert f"in use by another process (pid {proc.pid}" in err, err
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # dies holding the lock: no clean release
        finish(proc)
    step = step_of(run / "checkpoints" / "last.ckpt")
    code = cli.main([f"runs_dir={runs}", *QUICK, "resume=auto", f"phases.p1.max_steps={step + 1}"])
    assert code == 0, capsys.readouterr().err
    assert f"taking over the stale lock of pid {proc.pid}" in caplog.text
    assert step_of(run / "checkpoints" / "final.ckpt") == step + 1


def test_a_process_with_live_signal_proof_workers_still_exits(tmp_path):
    """Workers ignore SIGTERM, which multiprocessing uses to end daemonic children at exit: an iterator left open
    must not make the process hang there."""
    script = (
        "from dcae_train.data import DataConfig\n"
        "from dcae_train.training.datamodule import ImageDataModule\n"
        "dm = ImageDataModule(DataConfig(train='demo', num_workers=2), resolution=32, batch_size=2)\n"
        "dm.setup()\n"
        "it = iter(dm.train_dataloader())\n"
        "next(it)\n"
        "print('got a batch', flush=True)\n"  # exits with `it` (and its two workers) alive
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          start_new_session=True)  # fmt: skip
    assert done.returncode == 0 and "got a batch" in done.stdout, done.stderr[-2000:]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait a while for its new parent to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_workers_die_with_a_killed_main_process(tmp_path):
    """A SIGKILLed main process (OOM killer, node drain, `kill -9`) takes its workers with it, even one busy in a
    sample: torch's own parent check runs only between samples, and the worker ignores the group signals."""
    pid_file = tmp_path / "worker.pid"
    script = (
        "import os, time, torch\n"
        "from dcae_train.data.webdataset import SignalProofDataLoader\n"
        "class Busy(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i):\n"
        f"        open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "        while True: pass  # a sample that never ends\n"
        "next(iter(SignalProofDataLoader(Busy(), num_workers=1)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not pid_file.is_file() or not pid_file.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the worker never started"
            time.sleep(0.05)
        worker = int(pid_file.read_text())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = _running(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived the killed main process"


def test_signal_proof_workers_run_under_the_forkserver_start_method():
    """There a worker's parent is the fork server, not the process that built the loader: it must still work."""
    data = torch.utils.data.TensorDataset(torch.arange(6.0))
    loader = SignalProofDataLoader(data, batch_size=2, num_workers=2, multiprocessing_context="forkserver")
    assert torch.cat([b[0] for b in loader]).tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
