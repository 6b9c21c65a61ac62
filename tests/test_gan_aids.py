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
    assert torch.equal(translate(x, torch.tensor([1, -2]), torch.tensor([0, 3]), pad=4), out)  # any bound: same
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


# GAN health and the collapse guard ---------------------------------------------------------------------
def test_collapse_guard_trips_after_n_steps_in_a_row_and_restarts():
    from dcae_train.losses.config import CollapseGuardConfig
    from dcae_train.training.gan_health import CollapseGuard

    guard = CollapseGuard(CollapseGuardConfig(steps=3, accuracy=0.9))
    trips = [guard.update(a) for a in (0.95, 0.99, 0.5, 0.95, 0.96, 0.97, 0.99)]
    assert trips == [False, False, False, False, False, True, False]
    assert int(guard.trips) == 1 and int(guard.streak) == 1
    assert {"streak", "trips"} <= set(guard.state_dict())  # saved with the checkpoint


def test_reset_discriminator_is_seeded_and_rewarms():
    cfg = LossConfig(lpips=0.0, gan=0.1, disc=DiscConfig(layers=2, width=8), disc_start=0, gan_start=5, lecam=0.1)
    a, b = AutoencoderLoss(cfg), AutoencoderLoss(cfg)
    before = [p.clone() for p in a.discriminator.parameters()]
    a.lecam.ema_real.fill_(3.0)
    a.reset_discriminator(step=100)
    b.reset_discriminator(step=100)
    after = list(a.discriminator.parameters())
    assert all(
        torch.equal(p, q) for p, q in zip(after, b.discriminator.parameters(), strict=True)
    )  # same on every rank
    assert not all(torch.equal(p, q) for p, q in zip(after, before, strict=True))
    assert a.lecam.ema_real.item() == 0.0
    assert not a.gan_active(104) and a.gan_active(106)  # D warms up for gan_start - disc_start steps again


def test_health_logs_include_head_gradient_norms():
    cfg = LossConfig(lpips=0.0, gan=0.1, disc=DiscConfig(layers=2, width=8))
    loss, head, x = AutoencoderLoss(cfg), nn.Conv2d(3, 3, 3, padding=1), images(2, 32)
    _, logs = loss.generator_loss(x, head(x), step=0, last_layer=head.weight)
    assert logs["grad_norm_rec_last"] > 0 and logs["grad_norm_gan_last"] > 0
    lam = logs["grad_norm_rec_last"] / (logs["grad_norm_gan_last"] + 1e-4)
    assert torch.allclose(logs["adaptive_weight"], lam)


@pytest.mark.parametrize("action", [pytest.param("stop", marks=pytest.mark.slow), "reset"])
def test_collapse_guard_in_a_phase3_run(tmp_path, action):
    """A guard that sees a winning D on every step: stop ends the run after one step; reset re-initialises D, logs
    the trips and keeps its state in the checkpoint."""
    from dcae_train.config import compose
    from dcae_train.training.run import build_run

    cfg = compose([
        f"runs_dir={tmp_path / 'runs'}", "debug=smoke", "data=demo", "data.num_workers=0", "phase=3",
        "init_from=tiny", "phases.p3.max_steps=3", "phases.p3.loss.gan_start=0", "phases.p3.loss.lpips_net=alex",
        "phases.p3.loss.collapse.steps=1", f"phases.p3.loss.collapse.action={action}",
    ])  # fmt: skip
    run = build_run(cfg)
    guard = run.module.collapse
    guard.update = lambda accuracy: bool(guard.trips.add_(1))  # stands in for a D that wins every step
    run.trainer.fit(run.module, datamodule=run.datamodule)
    ckpt = torch.load(run.run_dir / "checkpoints" / "final.ckpt", weights_only=True, map_location="cpu")
    if action == "stop":
        assert ckpt["global_step"] == 1
        return
    assert ckpt["global_step"] == 3 and int(ckpt["state_dict"]["collapse.trips"]) == 3
    assert int(ckpt["state_dict"]["loss.gan_pause_until"]) == 3  # reset at step 2: G sees D again from step 3
