"""`python -m dcae_train.export`: both formats, both dtypes, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from dcae_train.export import main
from dcae_train.weights import load_model


def test_export_diffusers_then_original(tmp_path, capsys):
    from diffusers import AutoencoderDC

    assert main(["tiny-in", str(tmp_path / "d"), "--scaling-factor", "0.5"]) == 0
    assert "wrote diffusers fp32" in capsys.readouterr().out
    theirs = AutoencoderDC.from_pretrained(tmp_path / "d")
    assert theirs.config.scaling_factor == 0.5
    assert main([str(tmp_path / "d"), str(tmp_path / "o"), "--format", "original", "--dtype", "bf16"]) == 0
    sd = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_name"] is None
    assert load_model(tmp_path / "o").scaling_factor == 0.5


def test_export_errors_are_one_line(tmp_path, capsys):
    assert main(["does/not/exist/anywhere", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_module_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "dcae_train.export", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "--format" in res.stdout


def test_export_into_an_existing_folder_leaves_no_stale_weights(tmp_path):
    from dcae_train.models import build_model
    from dcae_train.weights import export_diffusers

    out = tmp_path / "export"
    export_diffusers(build_model("tiny"), out, dtype="bf16")
    export_diffusers(build_model("tiny"), out)  # fp32 now
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
