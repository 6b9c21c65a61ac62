"""Smoke test of scripts/bench_tiling.py: both parts at a small size and width (real figures: README).

The tile must exceed diffusers' 64 px blend (its stride is tile - 64)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_tiling.py"


def test_bench_tiling_runs_both_parts(monkeypatch, capsys):
    sizes = ["--width-a", "0.125", "--width-b", "0.125", "--size-a", "256", "--size-b", "256"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *sizes, "--tile", "128", "--overlap", "32"])
    monkeypatch.setenv("BENCH_THREADS", "1")
    spec = importlib.util.spec_from_file_location("bench_tiling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    out = capsys.readouterr().out
    assert "| ours (overlap 32 px, per-tile attention) |" in out
    assert "| ours (overlap 32 px, global attention) |" in out
    assert "ratio ours/diffusers at the defaults" in out
    assert "| ours, overlap 32 px |" in out and "| one 128 px tile, untiled |" in out
