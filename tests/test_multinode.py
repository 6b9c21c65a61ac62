"""Two nodes on one machine: torchrun, scripts/launch_torchrun.sh and scripts/launch_slurm.sh (with stand-ins for srun
and scontrol), gloo on CPU, the tiny variant on WebDataset shards written here.

The slow tests train a few phase-1 steps across two "nodes" and check what a real multi-node run needs: every global
rank reads a disjoint slice of the shards, only global rank 0 writes into the run folder (checkpoints, metrics,
images, the wandb offline run; every write is audited), all ranks end with identical weights, resume works the same
way, a killed or frozen node makes the other one exit in bounded time with a clear message, and a SLURM preemption
(exit 75) requeues the job, which then resumes. The fast tests check the scripts' rank, address and requeue logic
with stand-ins for the launchers.
"""

from __future__ import annotations

import copy
import datetime
import json
import signal
import subprocess
import time
import types
from pathlib import Path

import pytest
import torch
from _helpers_data import clean_shards
from _helpers_launch import (
    PRINT_LAUNCH,
    ROOT,
    SCONTROL,
    SRUN,
    Nodes,
    audited_writes,
    child_env,
    free_port,
    signal_tree,
    wait_for,
    write_tool,
)

from dcae_train.config import compose as compose_config
from dcae_train.config import to_config
from dcae_train.training import checkpoint as ckpt_lib
from dcae_train.training import run as run_lib
from dcae_train.training.ranks import is_lost_rank, mismatched_ranks, weights_fingerprint

SHARDS = 8  # two samples each: each rank's slice is 4 shards, and an epoch (2 batches of 2) reads from several
TIMEOUT_S = 20  # trainer.collective_timeout_s in these runs
LAUNCH_TIMEOUT = 420  # per launch of two nodes, on a loaded 2-core machine


def train_args(tmp_path: Path, steps: int, *extra: str) -> list[str]:
    shards = tmp_path / "shards"
    if not shards.is_dir():
        clean_shards(shards, [2] * SHARDS, w=80, h=80)
    return [
        f"runs_dir={tmp_path / 'runs'}",
        "debug=smoke",
        "data=webdataset",
        f"data.train={shards}/shard-{{000000..{SHARDS - 1:06d}}}.tar",
        f"data.val={shards}/shard-{{000000..000001}}.tar",
        "data.num_workers=0",
        "data.val_num_workers=0",
        "data.shuffle_buffer=4",
        "data.epoch_batches=2",
        "trainer.accelerator=cpu",
        "logger.wandb.mode=offline",
        f"trainer.collective_timeout_s={TIMEOUT_S}",
        f"phases.p1.max_steps={steps}",
        *extra,
    ]


def torchrun(node: int, port: int, run_id: str) -> list[str]:
    return ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr",
            "127.0.0.1", "--master-port", str(port), "--rdzv-id", run_id, "-m", "dcae_train",
            "trainer.devices=1", "trainer.num_nodes=2", "trainer.strategy=ddp"]  # fmt: skip


def launch_two(tmp_path: Path, tag: str, make_cmd, env_of) -> Nodes:
    nodes = Nodes()
    for node in (0, 1):
        nodes.start(make_cmd(node), env_of(node), tmp_path / f"{tag}-node{node}.log", cwd=tmp_path)
    return nodes


def finish(nodes: Nodes) -> None:
    try:
        codes = nodes.wait(LAUNCH_TIMEOUT)
        assert codes == [0, 0], nodes.tails()
    finally:
        nodes.close()


def check_run(tmp_path: Path, run: Path, step: int, segments: int) -> None:
    """What the run folder holds after `segments` launches ending at `step`, and who wrote it."""
    report = json.loads((run / "ranks.json").read_text())
    ranks = report["ranks"]
    assert report["world_size"] == 2 and [r["global_rank"] for r in ranks] == [0, 1]
    assert [r["node_rank"] for r in ranks] == [0, 1], "one rank per node"
    assert all(r["step"] == step for r in ranks)
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"], "the replicas hold identical weights"
    read = [set(r["shards_last_epoch"]) for r in ranks]
    assert all(read) and not read[0] & read[1], f"each rank reads its own slice of the shards: {read}"
    assert json.loads((run / "FINISHED.json").read_text())["step"] == step
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == step
    assert (run / "metrics.csv").is_file() and list((run / "images").glob("*.png"))
    assert len(list((run / "wandb").glob("offline-run-*"))) == segments, "one wandb offline run per launch"
    writes = audited_writes(tmp_path)
    assert not writes.get("1"), f"global rank 1 wrote into the run folder: {writes.get('1')[:5]}"
    assert not writes.get("launcher"), writes.get("launcher")
    assert any("checkpoints" in p for p in writes.get("0", [])), "rank 0 wrote the checkpoints"


def only_run(tmp_path: Path) -> Path:
    (run,) = (tmp_path / "runs" / "quickstart" / "phase1").iterdir()
    return run


def fail_node_1(nodes: Nodes, tmp_path: Path, run: str, sig: int, wait_s: float) -> tuple[int, float, str]:
    """After the run's first checkpoint, send `sig` to node 1's process tree; node 0's exit code, the seconds it
    took to exit, and its log."""
    try:
        wait_for(tmp_path / f"runs/quickstart/phase1/{run}/checkpoints/step00000002.ckpt", nodes, LAUNCH_TIMEOUT)
        signal_tree(nodes.procs[1].pid, sig)
        t0 = time.monotonic()
        code = nodes.procs[0].wait(timeout=wait_s)
        return code, time.monotonic() - t0, nodes.logs[0].read_text(errors="replace")
    finally:
        nodes.close()


# torchrun, two launcher processes ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_nodes_with_torchrun_train_and_resume(tmp_path):
    port, env = free_port(), child_env(tmp_path)

    def launch(steps: int, *extra: str) -> None:
        def cmd(n):
            return [*torchrun(n, port, "two-nodes"), *train_args(tmp_path, steps, "phases.p1.ckpt_every=2", *extra)]

        finish(launch_two(tmp_path, f"steps{steps}", cmd, lambda n: env))

    launch(4)
    run = only_run(tmp_path)
    assert run.name == "job-two-nodes", "the rendezvous id names the run folder on both nodes"
    check_run(tmp_path, run, step=4, segments=1)
    launch(6, "resume=auto")
    check_run(tmp_path, run, step=6, segments=2)
    assert (run / "config.resumed.yaml").is_file()


# scripts/launch_torchrun.sh: a node is killed, the other exits, both resume --------------------------------------
def script_env(tmp_path: Path, node: int, port: int, **extra: str) -> dict[str, str]:
    return child_env(tmp_path, NNODES="2", NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                     GPUS="1", RUN_ID="elastic", **extra)  # fmt: skip


@pytest.mark.slow
def test_launch_torchrun_node_killed_the_other_exits_then_both_resume(tmp_path):
    port, script = free_port(), str(ROOT / "scripts" / "launch_torchrun.sh")
    args = train_args(tmp_path, 6, "phases.p1.ckpt_every=2")

    def env_of(node: int) -> dict[str, str]:
        return script_env(tmp_path, node, port)

    nodes = launch_two(tmp_path, "killed", lambda n: ["bash", script, *args], env_of)
    # node 1 is gone: its launcher and its rank at once
    code, elapsed, log0 = fail_node_1(nodes, tmp_path, "job-elastic", signal.SIGKILL, TIMEOUT_S + 60)
    assert code != 0
    assert "lost contact with the other ranks" in log0 and "resume=auto" in log0, log0[-3000:]
    assert elapsed < TIMEOUT_S + 30, f"node 0 took {elapsed:.0f} s to notice"
    print(f"node 0 exited {elapsed:.1f} s after node 1 was killed")

    resumed = [*args, "resume=auto"]
    finish(launch_two(tmp_path, "resumed", lambda n: ["bash", script, *resumed], env_of))
    run = only_run(tmp_path)
    check_run(tmp_path, run, step=6, segments=2)


@pytest.mark.slow
def test_frozen_node_fails_the_other_within_the_collective_timeout(tmp_path):
    port, env = free_port(), child_env(tmp_path)
    args = train_args(tmp_path, 40, "phases.p1.ckpt_every=2")
    nodes = launch_two(tmp_path, "frozen", lambda n: [*torchrun(n, port, "frozen"), *args], lambda n: env)
    # a hung node: alive, sockets open, never answers
    code, elapsed, log0 = fail_node_1(nodes, tmp_path, "job-frozen", signal.SIGSTOP, TIMEOUT_S + 90)
    assert code != 0 and "lost contact with the other ranks" in log0, log0[-3000:]
    assert f"trainer.collective_timeout_s={TIMEOUT_S}" in log0
    assert TIMEOUT_S - 5 < elapsed < TIMEOUT_S + 45, f"node 0 exited {elapsed:.0f} s after node 1 froze"
    print(f"node 0 exited {elapsed:.1f} s after node 1 froze (timeout {TIMEOUT_S} s)")


# scripts/launch_slurm.sh under a stand-in allocation: preempted, requeued, resumed -------------------------------
def slurm_env(tmp_path: Path, job_id: int, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "slurm-bin"
    write_tool(bin_dir, "srun", SRUN)
    write_tool(bin_dir, "scontrol", SCONTROL)
    return child_env(
        tmp_path, [bin_dir], SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="dcae-train", SLURM_NNODES="2",
        SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NODELIST="127.0.0.[1-2]",
        SLURM_NODELIST="127.0.0.[1-2]", SCONTROL_LOG=str(tmp_path / "scontrol.log"), **extra,
    )  # fmt: skip


def slurm_job_id() -> int:
    return free_port(20000, 40000) - 20000  # the script listens on 20000 + job id % 20000


def run_slurm_script(tmp_path: Path, env: dict[str, str], *args: str, timeout: float = LAUNCH_TIMEOUT):
    nodes = Nodes()
    nodes.start(["bash", str(ROOT / "scripts" / "launch_slurm.sh"), *args], env, tmp_path / "slurm.log", tmp_path)
    try:
        (code,) = nodes.wait(timeout)
    finally:
        nodes.close()
    return code, nodes.logs[0].read_text(errors="replace")


@pytest.mark.slow
def test_launch_slurm_preempted_job_is_requeued_and_resumes(tmp_path):
    job = slurm_job_id()
    args = train_args(tmp_path, 6, "phases.p1.ckpt_every=100")
    code, log = run_slurm_script(tmp_path, slurm_env(tmp_path, job, DCAE_TRAIN_FAULTS="sigterm@3"), *args)
    assert code == 0, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", str(job)], "exit 75 -> requeue"
    run = only_run(tmp_path)
    assert run.name == f"job-{job}"
    assert (run / "checkpoints" / "preempt-step00000003.ckpt").is_file() and not (run / "FINISHED.json").exists()

    code, log = run_slurm_script(tmp_path, slurm_env(tmp_path, job, SLURM_RESTART_COUNT="1"), *args)
    assert code == 0, log[-3000:]
    assert (tmp_path / "scontrol.log").read_text().count("requeue") == 1, "a finished job is not requeued"
    check_run(tmp_path, run, step=6, segments=2)


# The scripts' rank, address and requeue logic, with stand-in launchers (fast) -------------------------------------
def fake_launch(tmp_path: Path, script: str, env: dict[str, str], *args: str):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return proc.returncode, lines, proc.stderr


def test_launch_torchrun_passes_node_rank_address_and_run_id(tmp_path):
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "torchrun", PRINT_LAUNCH)
    env = child_env(tmp_path, [bin_dir], NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.7", MASTER_PORT="29555",
                    GPUS="4", RUN_ID="r1")  # fmt: skip
    code, (out,), _ = fake_launch(tmp_path, "launch_torchrun.sh", env, "recipe=dc-ae-f32c32-sana-1.1", "phase=1")
    assert code == 0
    argv = " ".join(out["argv"])
    assert "--nnodes 2 --node-rank 1 --nproc-per-node 4 --master-addr 10.0.0.7 --master-port 29555 --rdzv-id r1" in argv
    assert argv.endswith(
        "-m dcae_train trainer.devices=4 trainer.num_nodes=2 trainer.strategy=ddp recipe=dc-ae-f32c32-sana-1.1 phase=1"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NNODES": "2", "NODE_RANK": "0", "GPUS": "8"}, "needs RUN_ID"),
        ({"NNODES": "2", "NODE_RANK": "2", "GPUS": "8", "RUN_ID": "x"}, "NODE_RANK=2 must be in 0..1"),
        ({}, "set GPUS="),  # and nvidia-smi finds no GPU
    ],
)
def test_launch_torchrun_refuses_what_cannot_work(tmp_path, env, message):
    bin_dir = tmp_path / "bin"
    write_tool(bin_dir, "torchrun", PRINT_LAUNCH)
    write_tool(bin_dir, "nvidia-smi", "#!/usr/bin/env bash\nexit 9\n")  # a machine without a GPU
    code, lines, err = fake_launch(tmp_path, "launch_torchrun.sh", child_env(tmp_path, [bin_dir], **env), "phase=1")
    assert code == 2 and not lines and message in err, err


def test_launch_slurm_ranks_address_port_resume_and_requeue(tmp_path):
    bin_dir = tmp_path / "slurm-bin"
    write_tool(bin_dir, "python", PRINT_LAUNCH)  # every task prints its environment instead of training
    env = slurm_env(tmp_path, 1234567)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    code, tasks, _ = fake_launch(tmp_path, "launch_slurm.sh", env, "recipe=dc-ae-f32c32-sana-1.1")
    assert code == 0 and len(tasks) == 2
    tasks.sort(key=lambda t: t["SLURM_PROCID"])
    ranks = [(t["SLURM_PROCID"], t["SLURM_NODEID"], t["SLURM_LOCALID"]) for t in tasks]
    assert ranks == [("0", "0", "0"), ("1", "1", "0")], "global rank, node, local rank of each task"
    assert {t["MASTER_ADDR"] for t in tasks} == {"127.0.0.1"}, "rank 0 listens on the job's first node"
    assert {t["MASTER_PORT"] for t in tasks} == {str(20000 + 1234567 % 20000)}
    argv = " ".join(tasks[0]["argv"])
    assert argv == (
        "-m dcae_train trainer.devices=1 trainer.num_nodes=2 trainer.strategy=ddp recipe=dc-ae-f32c32-sana-1.1"
    )
    assert not (tmp_path / "scontrol.log").exists()

    env.update(SLURM_RESTART_COUNT="1", FAKE_EXIT="75")
    code, tasks, err = fake_launch(tmp_path, "launch_slurm.sh", env, "phase=1")
    assert tasks[0]["argv"][-2:] == ["phase=1", "resume=auto"], "a requeued job continues its run"
    assert code == 0 and (tmp_path / "scontrol.log").read_text() == "requeue 1234567\n", err

    env["FAKE_EXIT"] = "1"
    code, _, _ = fake_launch(tmp_path, "launch_slurm.sh", env, "phase=1")
    assert code == 1 and (tmp_path / "scontrol.log").read_text().count("requeue") == 1, "a failure is not requeued"


def test_launch_slurm_outside_a_job_says_so(tmp_path):
    code, lines, err = fake_launch(tmp_path, "launch_slurm.sh", child_env(tmp_path), "phase=1")
    assert code == 2 and not lines and "sbatch" in err


# Units: the replica check, lost ranks, the collective timeout, resume=auto's choice --------------------------------
def test_weights_fingerprint_is_exact_and_sees_one_changed_bit():
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    b = copy.deepcopy(a)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        w = b[0].weight.view(-1)
        w[5] = torch.nextafter(w[5], torch.tensor(2.0))  # the smallest possible change
    assert weights_fingerprint(a) != weights_fingerprint(b)
    same = [{"global_rank": r, "fingerprint": "f0"} for r in range(3)]
    assert mismatched_ranks(same) is None
    assert mismatched_ranks([*same, {"global_rank": 3, "fingerprint": "f1"}]) == {"f0": [0, 1, 2], "f1": [3]}


@pytest.mark.parametrize(
    "message",
    [
        "[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:12214",
        "Application timeout caused pair closure",
        "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation",
    ],
)
def test_gloo_transport_errors_count_as_a_lost_rank(message):
    assert is_lost_rank(RuntimeError(message))


def test_other_errors_are_not_a_lost_rank():
    assert is_lost_rank(torch.distributed.DistBackendError("NCCL watchdog: collective timed out"))
    assert not is_lost_rank(RuntimeError("CUDA out of memory"))
    assert not is_lost_rank(ValueError("gloo"))


def test_collective_timeout_reaches_ddp_and_has_a_floor():
    cfg = to_config(compose_config(["trainer.collective_timeout_s=45"]))
    module = types.SimpleNamespace(loss=types.SimpleNamespace(discriminator=None))
    assert run_lib._strategy(cfg, module)._timeout == datetime.timedelta(seconds=45)
    with pytest.raises(ValueError, match="trainer.collective_timeout_s=1: must be >= 10"):
        to_config(compose_config(["trainer.collective_timeout_s=1"]))


def test_resume_auto_takes_the_launch_s_own_run_folder_first(tmp_path):
    root = tmp_path / "runs" / "quickstart" / "phase1"
    for name in ("job-7", "job-8"):  # job-8 sorts newer
        (root / name / "checkpoints").mkdir(parents=True)
    newest, _ = ckpt_lib.resume_target(tmp_path / "runs", "quickstart", 1)
    assert newest.name == "job-8"
    own, _ = ckpt_lib.resume_target(tmp_path / "runs", "quickstart", 1, root / "job-7")
    assert own.name == "job-7", "a requeued job resumes its own run, not the newest folder"
