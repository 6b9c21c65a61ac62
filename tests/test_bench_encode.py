"""Smoke test of scripts/bench_encode.py at a tiny size (real figures: docs/measured.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_encode.py"


def test_bench_encode_prints_both_pipelines_and_the_ratio(capsys):
    spec = importlib.util.spec_from_file_location("bench_encode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--demo-images", "0", "--synthetic", "2", "--synthetic-size", "80", "--resolution", "32", "--reps", "1",
            "--batch-size", "2", "--num-workers", "0"]  # fmt: skip
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "| data | images | crop | ours (img/s) | plain loop (img/s) | ratio |" in out
    assert "| synthetic photos (long side 80 px) | 2 | 32 px square |" in out and "SANA buckets at 32^2 px" in out
