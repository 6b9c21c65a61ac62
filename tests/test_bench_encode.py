"""Smoke test of scripts/bench_encode.py at a tiny size (real figures: docs/measured.md)."""

from __future__ import annotations

from _helpers_scripts import load_script


def test_bench_encode_prints_both_pipelines_and_the_ratio(capsys):
    module = load_script("bench_encode")
    argv = ["--demo-images", "0", "--synthetic", "2", "--synthetic-size", "80", "--resolution", "32", "--reps", "1",
            "--batch-size", "2", "--num-workers", "0"]  # fmt: skip
    assert module.main(argv) == 0
    out = capsys.readouterr().out
    assert "| data | images | crop | ours (img/s) | plain loop (img/s) | ratio |" in out
    assert "| synthetic photos (long side 80 px) | 2 | 32 px square |" in out and "SANA buckets at 32^2 px" in out
