"""The DINO-feature discriminator: frozen trunk (no gradients, always eval, not saved), trained heads, and a
phase-3 step in fp32 and under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from dcae_train import cli
from dcae_train.losses import AutoencoderLoss, DiscConfig, LossConfig
from dcae_train.losses.config import FoundationConfig

RECIPE = "dc-ae-f32c32-sana-1.1-dinodisc"


@pytest.fixture(scope="module")
def dino_loss() -> AutoencoderLoss:
    cfg = LossConfig(lpips=0.0, gan=0.1, disc=DiscConfig(type="dino", width=16, norm="group", trunk_layers=[3, 11]))
    return AutoencoderLoss(cfg, foundation=FoundationConfig(require_pretrained=False), foundation_pretrained=False)


def test_trunk_is_frozen_in_eval_and_only_heads_train(dino_loss):
    d = dino_loss.discriminator
    d.train()
    assert not d.trunk.training and d.heads.training
    x, x_hat = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    loss, logs = dino_loss.discriminator_loss(x, x_hat, step=0)
    loss.backward()
    assert all(p.grad is None for p in d.trunk.parameters())
    assert all(p.grad is not None for p in d.heads.parameters())
    assert d(x).shape == (2, 1, 2 * 16 * 16)  # two heads x 16 x 16 tokens at 224 px
    d.zero_grad(set_to_none=True)


def test_generator_gradient_passes_through_the_frozen_trunk_under_bf16(dino_loss):
    head = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = dino_loss.generator_loss(x, head(x), step=0, last_layer=head.weight)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in dino_loss.discriminator.trunk.parameters())
    dino_loss.discriminator.zero_grad(set_to_none=True)


def test_r1_through_the_vit_trunk(dino_loss):
    """R1 differentiates D's input gradient: the trunk's attention must support a double backward."""
    from dcae_train.losses.regularizers import r1_penalty

    d = dino_loss.discriminator
    d.input_size = 56  # 4 x 4 tokens: the double backward through a ViT at 224 px takes ~15 s on two cores
    try:
        penalty = r1_penalty(d, torch.rand(1, 3, 28, 28) * 2 - 1)
        penalty.backward()
    finally:
        d.input_size = 224
    heads = dino_loss.discriminator.heads
    assert torch.isfinite(penalty) and all(h[0].weight.grad is not None for h in heads)  # the penalty trains D
    dino_loss.discriminator.zero_grad(set_to_none=True)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_dino_recipe_takes_a_phase3_step(tmp_path, precision):
    args = [f"runs_dir={tmp_path / 'runs'}", "debug=smoke", "data=demo", "data.num_workers=0", f"recipe={RECIPE}",
            "phase=3", "init_from=tiny", "phases.p3.max_steps=1", "phases.p3.loss.gan_start=0",
            "phases.p3.loss.lpips_net=alex", f"trainer.precision={precision}"]  # fmt: skip
    assert cli.main(args) == 0
    (run,) = (tmp_path / "runs" / RECIPE / "phase3").iterdir()
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("loss.discriminator.heads.") for k in keys)
    assert not any(k.startswith("loss.discriminator.trunk.") for k in keys)  # the trunk comes from its file
    assert ckpt["dcae"]["discriminator"]["type"] == "dino"
    assert ckpt["dcae"]["discriminator"]["trunk_weights"]["pretrained"] is False
    if precision == "bf16-mixed":
        return
    # Shared like the PatchGAN: the export and init_discriminator carry the heads, never the trunk.
    from dcae_train.config import compose
    from dcae_train.export import main as export_main
    from dcae_train.training.run import build_run

    assert export_main([str(run / "checkpoints" / "final.ckpt"), str(tmp_path / "shared"), "--with-discriminator"]) == 0
    cfg = compose([*args[:-2], f"init_discriminator={tmp_path / 'shared'}", "run_dir=" + str(tmp_path / "again")])
    heads = build_run(cfg).module.loss.discriminator.heads.state_dict()
    assert all(torch.equal(v, ckpt["state_dict"][f"loss.discriminator.heads.{k}"]) for k, v in heads.items())
