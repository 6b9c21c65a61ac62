"""Several "nodes" on one machine: launcher processes, stand-ins for srun and scontrol, a write audit, cleanup.

Each node is a launcher process (torchrun, or a launch script) in its own session. torchrun starts its workers
in sessions of their own, so a node is killed, frozen or cleaned up as a process tree (found through /proc), never
by process group. The write audit is a `sitecustomize` put first on the children's PYTHONPATH: a Python audit hook
that records every file the process creates, opens for writing, renames or removes below a watched folder, in
a log named after the process's global rank, so a test can tell which rank wrote what.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout under test: its dcae_train wins in every child
VENV_BIN = Path(sys.executable).parent  # torchrun and python of the interpreter running the tests

AUDIT_HOOK = r"""
import os, sys

_ROOT, _LOG = os.environ["AUDIT_ROOT"], os.environ["AUDIT_DIR"]
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_busy = [False]


def _path(p):
    return None if isinstance(p, int) or p is None else os.path.abspath(os.fsdecode(p))


def _writes(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
        return [_path(path)] if writing else []
    if event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir"):
        return [_path(args[0])] + ([_path(args[1])] if event == "os.rename" else [])
    return []


def _hook(event, args):
    if _busy[0] or event not in ("open", "os.rename", "os.mkdir", "os.remove", "os.rmdir"):
        return
    paths = [p for p in _writes(event, args) if p and (p + "/").startswith(_ROOT + "/")]
    if not paths:
        return
    _busy[0] = True
    try:
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "launcher"
        with open(os.path.join(_LOG, f"rank{rank}-pid{os.getpid()}.log"), "a") as f:
            f.writelines(f"{event}\t{p}\n" for p in paths)
    finally:
        _busy[0] = False


sys.addaudithook(_hook)
"""

SRUN = r"""#!/usr/bin/env bash
# srun stand-in: SLURM_NNODES x SLURM_NTASKS_PER_NODE tasks on this machine, each with the variables srun sets;
# forwards SIGTERM to them and exits with the highest exit code of any task, as srun does.
set -u
per_node=${SLURM_NTASKS_PER_NODE%%[(,]*}
ntasks=$(( SLURM_NNODES * per_node ))
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
pids=()
for (( i = 0; i < ntasks; i++ )); do
  SLURM_PROCID=$i SLURM_LOCALID=$(( i % per_node )) SLURM_NODEID=$(( i / per_node )) \
    SLURMD_NODENAME=${nodes[i / per_node]} SLURM_NTASKS=$ntasks SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
status=0
for p in "${pids[@]}"; do
  wait "$p"; s=$?
  (( s > status )) && status=$s
done
exit $status
"""

SCONTROL = r"""#!/usr/bin/env bash
# scontrol stand-in: `show hostnames LIST` expands "prefix[a-b]" and comma lists; `requeue ID` is recorded.
if [[ "$1 $2" == "show hostnames" ]]; then
  if [[ $3 =~ ^(.*)\[([0-9]+)-([0-9]+)\]$ ]]; then
    for (( n = BASH_REMATCH[2]; n <= BASH_REMATCH[3]; n++ )); do echo "${BASH_REMATCH[1]}$n"; done
  else
    tr ',' '\n' <<< "$3"
  fi
elif [[ $1 == requeue ]]; then
  echo "requeue $2" >> "$SCONTROL_LOG"
fi
"""

# Stands in for `python` or `torchrun` in the fast script tests: prints one JSON line per process and exits.
PRINT_LAUNCH = r"""#!/usr/bin/env bash
keys="SLURM_PROCID SLURM_LOCALID SLURM_NODEID MASTER_ADDR MASTER_PORT"
env_json=$(for k in $keys; do printf '"%s": "%s", ' "$k" "${!k:-}"; done)
args_json=$(printf '"%s", ' "$@")
echo "{${env_json} \"argv\": [${args_json%, }]}"
exit "${FAKE_EXIT:-0}"
"""


def free_port(low: int = 20000, high: int = 40000) -> int:
    """A TCP port in [low, high) that is free now (the launch scripts derive ports inside such a range)."""
    for port in range(low + os.getpid() % 997, high, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def write_tool(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)
    return path


def child_env(tmp_path: Path, bin_dirs: list[Path] = (), **extra: str) -> dict[str, str]:
    """The environment of every launched process: this checkout first on PYTHONPATH (after the write audit),
    offline wandb with its folders in tmp_path, no leftovers of an enclosing launch."""
    audit = tmp_path / "audit"
    audit.mkdir(exist_ok=True)
    hook = write_tool(tmp_path / "audit_hook", "sitecustomize.py", AUDIT_HOOK).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "DCAE_TRAIN_"))}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK"):
        env.pop(k, None)
    env.update(
        PYTHONPATH=os.pathsep.join([str(hook), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        PATH=os.pathsep.join([*map(str, bin_dirs), str(VENV_BIN), env.get("PATH", "")]),
        AUDIT_ROOT=str((tmp_path / "runs").resolve()),
        AUDIT_DIR=str(audit),
        WANDB_MODE="offline",
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def audited_writes(tmp_path: Path) -> dict[str, list[str]]:
    """{rank: [written paths]} from the audit logs ("launcher": a process that is no rank)."""
    out: dict[str, list[str]] = {}
    for log in sorted((tmp_path / "audit").glob("rank*.log")):
        rank = log.name[len("rank") :].split("-pid")[0]
        out.setdefault(rank, []).extend(line.split("\t", 1)[1] for line in log.read_text().splitlines())
    return out


# Processes ------------------------------------------------------------------------------------------------
def descendants(pid: int) -> list[int]:
    """pid and every process below it (Linux /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in descendants(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


@dataclass
class Nodes:
    """Launcher processes started side by side; `close()` kills whatever of them is left (use in `finally`)."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start(self, cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
        fh = open(log, "w")  # noqa: SIM115 (closed when the process ends, by the OS)
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in self.procs]

    def tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for log in self.logs)

    def close(self) -> None:
        for proc in self.procs:
            signal_tree(proc.pid, signal.SIGKILL)  # also SIGSTOPped trees: SIGKILL ends them
            proc.wait(timeout=30)
        self.procs.clear()


def wait_for(path: Path, nodes: Nodes, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in nodes.procs):
            raise AssertionError(f"{path} did not appear\n{nodes.tails()}")
        time.sleep(0.2)
