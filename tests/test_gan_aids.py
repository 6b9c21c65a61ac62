"""GAN training aids: DiffAugment, LeCAM and R1 against direct computations on small examples, and the
discriminator step that combines them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dcae_train.losses import AutoencoderLoss, DiscConfig, LossConfig
from dcae_train.losses.augment import DiffAugment, cutout_mask, translate
from dcae_train.losses.config import DiffAugConfig
from dcae_train.losses.regularizers import LeCAM, r1_penalty
from dcae_train.schema import ConfigError

ALL = DiffAugConfig(policy=["color", "translation", "cutout"])


def images(b: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(b, 3, size, size) * 2 - 1


# DiffAugment ---------------------------------------------------------------------------------------------
def test_diffaugment_pairs_share_a_transform_and_calls_differ():
    aug, x = DiffAugment(ALL), images()
    a, b = aug.pair(x, x.clone())
    assert torch.equal(a, b)  # the same draw for both members of the pair
    assert not torch.equal(aug(x), aug(x))  # a new draw on every call
    assert len(set(aug.sample(x)["brightness"].flatten().tolist())) == 4  # and one draw per image


def test_translation_and_cutout_match_a_direct_computation():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5)
    out = translate(x, torch.tensor([1, -2]), torch.tensor([0, 3]))
    ref = torch.zeros_like(x)
    for b, (dy, dx) in enumerate([(1, 0), (-2, 3)]):
        for i in range(4):
            for j in range(5):
                if 0 <= i - dy < 4 and 0 <= j - dx < 5:
                    ref[b, 0, i, j] = x[b, 0, i - dy, j - dx]
    assert torch.equal(out, ref)
    mask = cutout_mask(torch.zeros(1, 1, 4, 4), torch.tensor([0]), torch.tensor([2]), 0.5)  # 2x2 square at (0, 2)
    ref = torch.ones(1, 1, 4, 4)
    ref[0, 0, 0, 1:3] = 0  # rows -1..0 (clipped to 0), columns 1..2
    assert torch.equal(mask, ref)


def test_colour_ops_follow_the_definition_and_stay_differentiable():
    aug, x = DiffAugment(DiffAugConfig(policy=["color"])), images(2).requires_grad_(True)
    p = aug.sample(x)
    y = x + p["brightness"] - 0.5
    y = (y - y.mean(1, keepdim=True)) * p["saturation"] * 2 + y.mean(1, keepdim=True)
    y = (y - y.mean((1, 2, 3), keepdim=True)) * (p["contrast"] + 0.5) + y.mean((1, 2, 3), keepdim=True)
    out = aug.apply(x, p)
    assert torch.allclose(out, y, atol=1e-6)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_diffaug_config_rejects_unknown_ops():
    with pytest.raises(ConfigError, match="policy"):
        DiffAugConfig(policy=["colour"])


# LeCAM ------------------------------------------------------------------------------------------------
def test_lecam_matches_the_definition_and_updates_its_emas():
    lecam = LeCAM(decay=0.9)
    lecam.ema_real.fill_(0.5)
    lecam.ema_fake.fill_(-0.25)
    real, fake = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.75, 0.0, -2.0])
    reg = lecam(real, fake)
    ref = sum(max(r + 0.25, 0) ** 2 for r in real.tolist()) / 3 + sum(max(0.5 - f, 0) ** 2 for f in fake.tolist()) / 3
    assert reg.item() == pytest.approx(ref)
    assert lecam.ema_real.item() == pytest.approx(0.9 * 0.5 + 0.1 * 0.0)
    assert lecam.ema_fake.item() == pytest.approx(0.9 * -0.25 + 0.1 * fake.mean().item())
    assert {"ema_real", "ema_fake"} <= set(lecam.state_dict())  # travels with the checkpoint


# R1 ---------------------------------------------------------------------------------------------------
def test_r1_matches_the_closed_form_of_a_linear_discriminator():
    """D = 1x1 conv: sum_ij D(x) has gradient w_c at every pixel, so ||grad||^2 = H * W * sum_c w_c^2."""
    d = nn.Conv2d(3, 1, 1)
    x = images(2, 8)
    assert r1_penalty(d, x).item() == pytest.approx(64 * d.weight.pow(2).sum().item(), rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert r1_penalty(d, x).dtype == torch.float32  # fp32 island
    r1_penalty(d, x).backward()
    assert d.weight.grad is not None  # the penalty trains D


def test_discriminator_step_adds_lecam_and_lazy_r1():
    cfg = LossConfig(lpips=0.0, gan=0.1, disc=DiscConfig(layers=2, width=8), lecam=0.1, r1=2.0, r1_every=4)
    loss = AutoencoderLoss(cfg)
    x, x_hat = images(2, 32), images(2, 32)
    total, logs = loss.discriminator_loss(x, x_hat, step=4)  # an R1 step
    assert "loss_r1" in logs and "loss_lecam" in logs and 0 <= logs["disc_accuracy"] <= 1
    expected = logs["loss_disc"] + 0.1 * logs["loss_lecam"] + 2.0 / 2 * 4 * logs["loss_r1"]
    assert torch.allclose(total.detach(), expected)
    _, logs = loss.discriminator_loss(x, x_hat, step=5)
    assert "loss_r1" not in logs


def test_generator_term_sees_augmented_fakes():
    cfg = LossConfig(lpips=0.0, gan=0.1, disc=DiscConfig(layers=2, width=8), adaptive_weight=False, diffaug=ALL)
    loss = AutoencoderLoss(cfg)
    x_hat = images(2, 32).requires_grad_(True)
    total, first = loss.generator_loss(x_hat.detach(), x_hat, step=0)
    _, second = loss.generator_loss(x_hat.detach(), x_hat, step=0)
    assert first["loss_gan"] != second["loss_gan"]  # D saw a new draw of the same fakes
    total.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0  # gradients pass through the augmentation
