"""Smoke test of scripts/bench_gan.py: one step of every configuration, one line each with its ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers_scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_gan.py"


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_gan")


@pytest.mark.slow  # ~40 s on 2 cores: eleven configurations, three of them with a ViT-S
def test_every_addition_gets_a_ratio_line(bench, capsys):
    assert bench.main(["--steps", "1", "--warmup", "0", "--resolution", "32"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("p")]
    names = [line.split()[1] for line in lines]
    assert names == [
        "base",
        "+vf",
        "+vf",
        "+repa",
        "+vf+repa",
        "base",
        "+diffaug",
        "+lecam",
        "+r1",
        "+collapse",
        "+dino",
    ]
    assert all(" x" in line for line in lines)


def test_bad_arguments_fail_clearly(bench):
    with pytest.raises(ValueError, match="--phases"):
        bench.parse_args(["--phases", "2"])
