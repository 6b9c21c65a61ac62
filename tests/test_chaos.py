"""The chaos script (scripts/chaos.py): its seeded plan, and one full run that must end bit-identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers_scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "chaos.py"
chaos = load_script("chaos")


@pytest.mark.parametrize("seed", range(20))
def test_plan_has_every_fault_once_at_reachable_steps(seed):
    plan = chaos.make_plan(seed, 16)
    assert plan == chaos.make_plan(seed, 16), "the same seed gives the same plan"
    assert sorted(s.ends_with for s in plan[:3]) == sorted(chaos.INTERRUPTIONS) and plan[3].ends_with is None
    steps = [s.step for s in plan[:3]]
    assert steps[0] >= 4, "an earlier checkpoint exists to fall back to"
    assert all(b - a >= 2 for a, b in zip(steps, steps[1:], strict=False)) and steps[-1] <= 16 - 3
    (concurrent,) = [s for s in plan if s.concurrent]
    assert concurrent.ends_with in ("sigterm", "sigint"), "tried while a run is alive until signalled"
    assert sorted(a for s in plan for a in s.after) == ["corrupt", "move"]
    assert not plan[3].after


def test_seeds_vary_the_plan_and_too_few_steps_are_refused():
    assert len({chaos.describe(chaos.make_plan(seed, 16)) for seed in range(20)}) > 5
    with pytest.raises(SystemExit, match="at least 13"):
        chaos.make_plan(0, 12)


@pytest.mark.slow
def test_chaos_run_ends_equal_to_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    args = [sys.executable, str(SCRIPT), "--seed", "1", "--steps", "13", "--workdir", str(tmp_path / "w")]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "final weights equal the uninterrupted run's: yes" in done.stdout
    for fault in ("SIGKILL mid-write", "group SIGTERM", "group SIGINT", "concurrent", "corrupt newest", "moved"):
        assert fault in done.stdout, fault
