"""Smoke test of scripts/bench_train.py: one step of every configuration (ours in Lightning, plain, baseline) on
the tiny variant, the table and the criteria lines, plus the argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers_scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_train")


def test_one_step_all_configs(bench, capsys):
    # bf16-mixed on CPU exercises the GPU precision path (autocast, fp32 LPIPS island) as far as a CPU allows.
    bench.main(
        [
            "--quick",
            "--variant",
            "tiny",
            "--width",
            "1",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--cases",
            "1@64,3@64",
            "--precision",
            "bf16-mixed",
        ]
    )
    out = capsys.readouterr().out
    for cfg in ("| ours |", "| plain |", "| baseline |"):
        assert out.count(cfg) == 2, out
    assert "p1 ours/baseline step time" in out
    assert "p3@64 ours / p1 ours step time" in out


@pytest.mark.parametrize("which", ["ours", "plain", "baseline"])
def test_child_reports_times_and_peak(bench, which):
    s = bench.Settings("tiny", 1.0, "cpu", "32", 1, 2, 1, True, False, 512)
    spec = {"settings": bench.asdict(s), "case": {"phase": 2, "resolution": 64}, "which": which}
    out = bench.child_run(spec)
    assert len(out["times"]) == 3 and all(t > 0 for t in out["times"])
    assert out["peak_gib"] >= 0 and out["kind"] == "step peak RSS"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--cases", "1@250"], "multiple of 32"),
        (["--cases", "4@256"], "phase must be"),
        (["--cases", "oops"], "PHASE@RES"),
        (["--width", "2"], "--width"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_bad_arguments_named(bench, argv, match):
    with pytest.raises(ValueError, match=match):
        bench.parse_args(argv)
