"""Smoke test of scripts/bench_tiling.py: both parts at a small size and width (real figures: README).

The tile must exceed diffusers' 64 px blend (its stride is tile - 64)."""

from __future__ import annotations

import sys

from _helpers_scripts import SCRIPTS, load_script


def test_bench_tiling_runs_both_parts(monkeypatch, capsys):
    sizes = ["--width-a", "0.125", "--width-b", "0.125", "--size-a", "256", "--size-b", "256"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / "bench_tiling.py"), *sizes, "--tile", "128", "--overlap", "32"])
    monkeypatch.setenv("BENCH_THREADS", "1")
    module = load_script("bench_tiling")
    module.main()
    out = capsys.readouterr().out
    assert "| ours (overlap 32 px, per-tile attention) |" in out
    assert "| ours (overlap 32 px, global attention) |" in out
    assert "ratio ours/diffusers at the defaults" in out
    assert "| ours, overlap 32 px |" in out and "| one 128 px tile, untiled |" in out
