"""`python -m dcae_train.cost`: FLOPs against a direct count, memory against a measured CPU peak, the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from dcae_train import cost
from dcae_train.config import compose, to_config
from dcae_train.losses.perceptual import LPIPS
from dcae_train.models import build_model
from dcae_train.training.run import build_run

ROOT = Path(__file__).resolve().parents[1]
CONV_BACKWARD = torch.ops.aten.convolution_backward


def _backward_flops(conv: torch.nn.Conv2d, x: torch.Tensor, **mode_args) -> int:
    conv(x).sum().backward()  # warm: no lazy state inside the counted region
    with FlopCounterMode(display=False, **mode_args) as mode:
        conv(x).sum().backward()
    return mode.get_flop_counts()["Global"][CONV_BACKWARD]


def test_conv_backward_formula_is_torchs_for_dense_and_exact_for_grouped():
    corrected = {"custom_mapping": cost.CORRECTED_FORMULAS}
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    dense = torch.nn.Conv2d(16, 32, 3, padding=1)
    assert _backward_flops(dense, x, **corrected) == _backward_flops(dense, x)
    depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
    macs = 2 * 8 * 8 * 16 * 9  # per gradient: one multiply-add per output pixel, channel and tap
    by_hand = 2 * 2 * macs  # input and weight gradient, 2 FLOP per multiply-add
    assert _backward_flops(depthwise, x, **corrected) == by_hand
    assert _backward_flops(depthwise, x) > 8 * by_hand  # torch's formula multiplies the weight term by groups


def test_sana_256_flops_agree_with_a_direct_count():
    """The cost command's per-image FLOPs of phase 1 (256 px) against FlopCounterMode around a plain forward and
    backward of the full-width model (fake tensors), alone and with the LPIPS loss of the phase."""
    cfg = cost.phase_configs(["recipe=dc-ae-f32c32-sana-1.1"])[0]
    assert cfg.phase_config.resolution == 256 and cfg.phase_config.loss.lpips_net == "vgg"
    step, autoencoder = cost.count_step(cfg, step=0)
    mapping = cost.CORRECTED_FORMULAS
    with FakeTensorMode():
        model = build_model("dc-ae-f32c32-sana-1.1").set_gradient_checkpointing(True)
        lpips = LPIPS("vgg", pretrained=False, shapes_only=True)
        x = torch.randn(1, 3, 256, 256)
        with FlopCounterMode(display=False, custom_mapping=mapping) as direct_ae:
            x_hat = model(x)
            x_hat.backward(torch.ones_like(x_hat))
        with FlopCounterMode(display=False, custom_mapping=mapping) as direct_step:
            x_hat = model(x)
            (F.l1_loss(x_hat, x) + lpips(x_hat, x)).backward()
    ae, total = direct_ae.get_total_flops(), direct_step.get_total_flops()
    assert abs(autoencoder - ae) / ae < 0.01, (autoencoder / 1e9, ae / 1e9)
    assert abs(step.total - total) / total < 0.01, (step.total / 1e9, total / 1e9)
    assert 840e9 < step.forward - 80e9 < 850e9  # 846.7 GFLOP forward of the autoencoder, ~80 of LPIPS (2 images)


# Tiny runs whose one real step must cost what the command counts: phase 3 with the PatchGAN and the adaptive GAN
# weight from step 0; phase 1 with VF (adaptive weight) and REPA on a random DINOv2 ViT-S; phase 3 with the DINO
# discriminator (56 px trunk input), DiffAugment, LeCAM, R1 on this step and the collapse guard.
TINY_STEPS = {
    "patchgan": ["phase=3", "phases.p3.loss.gan_start=0", "phases.p3.loss.disc_start=0"],
    "vf-repa": [
        "phase=1", "phases.p1.loss.vf.weight=0.1", "phases.p1.loss.repa.weight=0.5", "phases.p1.loss.repa.hidden=64",
    ],
    "dino-diffaug-lecam-r1": [
        "phase=3", "phases.p3.loss.gan_start=0", "phases.p3.loss.disc_start=0", "phases.p3.loss.disc.type=dino",
        "phases.p3.loss.disc.input_size=56", "phases.p3.loss.disc.norm=group", "phases.p3.loss.lecam=0.001",
        "phases.p3.loss.diffaug.policy=[color,translation,cutout]", "phases.p3.loss.r1=1.0",
        "phases.p3.loss.collapse.steps=5",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(TINY_STEPS))
def test_train_step_counts_what_the_trainers_step_runs(tmp_path, case):
    """cost.train_step against AutoencoderModule.training_step in a real one-step fit (tiny, debug=smoke): the
    same FLOPs, to the last one."""
    phase = TINY_STEPS[case][0].partition("=")[2]
    overrides = [
        "recipe=quickstart", f"runs_dir={tmp_path}", "debug=smoke", "data=demo", "data.num_workers=0",
        f"phases.p{phase}.max_steps=1", *TINY_STEPS[case], *(["init_from=tiny"] if phase != "1" else []),
    ]  # fmt: skip
    run = build_run(compose(overrides))
    counted, step = [], run.module.training_step

    def counted_step(*args, **kwargs):
        with FlopCounterMode(display=False, custom_mapping=cost.CORRECTED_FORMULAS) as mode:
            out = step(*args, **kwargs)
        counted.append(mode.get_total_flops())
        return out

    run.module.training_step = counted_step
    run.trainer.fit(run.module, datamodule=run.datamodule)
    cfg = to_config(compose(overrides))
    ours, _ = cost.count_step(cfg, step=0)
    assert counted == [ours.total * cfg.phase_config.batch_size]


def test_lazy_r1_is_amortised_and_the_alignment_nets_are_counted():
    """R1 every 16 steps adds 1/16 of an R1 step's extra cost; the VF phase counts the foundation model's forward
    (no backward: it has no graph) and the adaptive VF weight's second pass back through the decoder."""
    base = ["recipe=quickstart", "debug=smoke", "phase=3", "phases.p3.loss.gan_start=0"]
    cfg = cost.phase_configs([*base, "phases.p3.loss.r1=1.0", "phases.p3.loss.r1_every=16"])[0]
    every, never = (cost.count_step(cost.with_r1(cfg, on), step=0)[0].total for on in (True, False))
    assert every > never
    assert cost.amortised_step(cfg, step=0)[0].total == pytest.approx(never + (every - never) / 16)
    p1 = ["recipe=quickstart", "debug=smoke", "phase=1"]
    plain = cost.count_step(cost.phase_configs(p1)[0], step=0)[0]
    vf_fixed = cost.count_step(cost.phase_configs([*p1, *VF, "phases.p1.loss.vf.adaptive_weight=false"])[0], step=0)[0]
    vf = cost.count_step(cost.phase_configs([*p1, *VF])[0], step=0)[0]
    assert vf_fixed.forward > plain.forward and vf_fixed.backward == pytest.approx(plain.backward, rel=0.01)
    assert vf.backward > 1.2 * vf_fixed.backward  # the rec gradient at the encoder's last layer: decoder + LPIPS again


VF = ["phases.p1.loss.vf.weight=0.1"]


@pytest.mark.slow
def test_phase2_memory_estimate_matches_a_measured_cpu_peak():
    """sana-1.1 phase 2 at 1024 px (batch 1, fp32, checkpointing as the recipe) at 1/8 width: the estimate within
    20% of the resident-set peak of two real training steps in a fresh process (~2 min on 2 cores)."""
    overrides = ["recipe=dc-ae-f32c32-sana-1.1", "trainer.precision=32", "trainer.devices=1", "phases.p2.batch_size=1"]
    # glibc hands large freed blocks back at once, so the resident set follows the live tensors (as bench_model.py)
    malloc = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), **malloc}
    helper = str(ROOT / "tests" / "_helpers_cost.py")
    out = subprocess.run([sys.executable, helper, "2", "0.125", *overrides], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(got["estimate"] - got["measured"]) / got["measured"] < 0.2, got


def test_command_prints_every_phase_and_refuses_bad_flags(capsys):
    assert cost.main(["recipe=quickstart", "--markdown", "--mfu", "0.5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| recipe | phase |") and len(table) == 5
    assert [r.split("|")[2].strip() for r in table[2:]] == ["1", "2", "3"]
    assert cost.main(["recipe=quickstart", "--chip", "Z80"]) == 2
    assert "--chip=Z80 is not known" in capsys.readouterr().err
    assert cost.main(["recipe=quickstart", "--mfu", "1.5"]) == 2
    assert cost.main(["recipe=quickstart", "phases.p9.batch_size=1"]) == 2
    assert cost.main(["--all", "recipe=quickstart"]) == 2


def test_global_batch_images_and_gpu_hours_follow_the_config():
    cfg = cost.phase_configs(["recipe=quickstart", "trainer.devices=4", "trainer.num_nodes=2"])[0]
    c = cost.phase_cost(cfg)
    assert (c.devices, c.nodes, c.global_batch) == (4, 2, 8 * 4 * 2) and not c.assumed_devices
    assert c.images == 200 * 64
    assert c.gpu_hours(1e12, 0.5) == pytest.approx(c.images * c.flops.total / 0.5e12 / 3600)
    assert c.memory.ddp_buckets > 0 and c.frozen == 0


def test_docs_table_lists_every_recipe_and_phase():
    """docs/cost.md holds `python -m dcae_train.cost --all --markdown` (regenerating it takes minutes: not here)."""
    page = (ROOT / "docs" / "cost.md").read_text()
    table = page.split("<!-- cost-table:start -->\n")[1].split("<!-- cost-table:end -->")[0]
    assert table.splitlines()[0] == "| " + " | ".join(cost.COLUMNS) + " |"
    rows = {tuple(c.strip() for c in line.split("|")[1:3]) for line in table.splitlines()[2:]}
    assert rows == {(r, str(p)) for r in cost.recipe_names() for p in (1, 2, 3)}
