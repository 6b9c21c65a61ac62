"""Losses: L1/L2, GAN losses, adaptive weight, PatchGAN, LossConfig, AutoencoderLoss (random-trunk LPIPS)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from dcae_train.config import compose, to_config
from dcae_train.losses import (
    AutoencoderLoss,
    DiscConfig,
    LossConfig,
    NLayerDiscriminator,
    adaptive_weight,
    d_loss_fn,
    g_loss_fn,
    hinge_d_loss,
    hinge_g_loss,
    l1_loss,
    l2_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from dcae_train.schema import build

SMALL_DISC = DiscConfig(layers=2, width=8)


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


class TinyDecoderHead(nn.Module):
    """Stands in for the autoencoder: its conv weight is the `last_layer` of the adaptive weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


@pytest.fixture(scope="module")
def gan_loss() -> AutoencoderLoss:
    cfg = LossConfig(l1=1.0, lpips=0.5, lpips_net="alex", gan=0.5, disc=SMALL_DISC, disc_start=2, gan_start=5)
    return AutoencoderLoss(cfg, lpips_pretrained=False)


# Reconstruction ---------------------------------------------------------------------------------------


def test_l1_l2_values_and_fp32():
    x = torch.tensor([0.0, 1.0, -1.0, 0.5]).view(1, 1, 2, 2)
    x_hat = torch.tensor([0.5, 0.0, -1.0, 1.0]).view(1, 1, 2, 2)
    assert l1_loss(x_hat, x).item() == pytest.approx((0.5 + 1 + 0 + 0.5) / 4)
    assert l2_loss(x_hat, x).item() == pytest.approx((0.25 + 1 + 0 + 0.25) / 4)
    assert l1_loss(x_hat.bfloat16(), x.bfloat16()).dtype == torch.float32


def test_reconstruction_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="reconstruction shape"):
        l1_loss(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 16, 16))


# GAN losses -------------------------------------------------------------------------------------------


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # D: 1/2 (mean(relu(1 - real)) + mean(relu(1 + fake))) = 1/2 ((0 + 0.5)/2 + (0 + 1.5)/2) = 0.5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)  # -mean(fake)
    assert d_loss_fn("hinge") is hinge_d_loss and g_loss_fn("hinge") is hinge_g_loss


def test_non_saturating_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    expected_d = 0.5 * ((sp(-2.0) + sp(0.0)) / 2 + (sp(-1.0) + sp(3.0)) / 2)
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert non_saturating_g_loss(fake).item() == pytest.approx((sp(1.0) + sp(-3.0)) / 2, rel=1e-6)
    # at chance (all logits 0) D's loss is log 2, G's too
    zeros = torch.zeros(4)
    assert non_saturating_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert d_loss_fn("non_saturating") is non_saturating_d_loss and g_loss_fn("non_saturating") is non_saturating_g_loss


def test_gan_losses_are_fp32_on_bf16_logits():
    logits = torch.randn(2, 1, 6, 6).bfloat16()
    assert hinge_d_loss(logits, logits).dtype == torch.float32
    assert non_saturating_g_loss(logits).dtype == torch.float32


def test_unknown_gan_loss_name():
    with pytest.raises(ValueError, match="gan_loss='lsgan': use one of 'hinge', 'non_saturating'"):
        LossConfig(gan_loss="lsgan")  # the rule lives in the config; d_loss_fn takes a checked name
    assert d_loss_fn("hinge") is hinge_d_loss and g_loss_fn("non_saturating") is non_saturating_g_loss


# Adaptive weight --------------------------------------------------------------------------------------


def test_adaptive_weight_equals_hand_computation():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([1.0, 1.0, 2.0])
    rec = (w * a).sum()  # d rec / d w = a, ||a|| = 5
    g = (w.pow(2) * b).sum()  # d g / d w = 2 w b = [2, -4, 2], norm sqrt(24)
    lam = adaptive_weight(rec, g, w)
    assert lam.item() == pytest.approx(5.0 / (math.sqrt(24.0) + 1e-4), rel=1e-6)
    assert lam.dtype == torch.float32 and not lam.requires_grad
    assert w.grad is None  # torch.autograd.grad does not accumulate into .grad
    (rec + lam * g).backward()  # the graph was retained for the caller's backward
    assert torch.allclose(w.grad, a + lam * 2 * w.detach() * b)


def test_adaptive_weight_is_clamped():
    w = torch.ones(3, requires_grad=True)
    rec = (w * 10).sum()
    g = (w * 0).sum()  # zero adversarial gradient -> ratio 10 * sqrt(3) / 1e-4
    assert adaptive_weight(rec, g, w, max_weight=50.0).item() == 50.0


def test_adaptive_weight_needs_a_trainable_last_layer():
    w = torch.ones(3)
    with pytest.raises(ValueError, match="does not require grad"):
        adaptive_weight(w.sum(), w.sum(), w)


# Discriminator ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_discriminator_shapes_init_and_gradients(norm):
    d = NLayerDiscriminator(3, width=16, n_layers=3, norm=norm)
    x = images(2, 64).requires_grad_(True)
    logits = d(x)
    assert logits.shape == (2, 1, 64 // 8 - 2, 64 // 8 - 2)  # 3 stride-2 levels, then two stride-1 4x4 convs
    logits.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        assert abs(conv.weight.std().item() - 0.02) < 0.01  # DCGAN init
        # a conv right before a BatchNorm/GroupNorm has no bias (the norm's shift makes it redundant)
    assert all(c.bias is not None for c in (convs[0], convs[-1]))
    assert all((c.bias is None) == (norm != "none") for c in convs[1:-1])


def test_discriminator_taming_size():
    # The taming/[3P] configuration: n_layers=3, 64 channels, BatchNorm -> 2.77M parameters, 30x30 logits at 256 px.
    d = NLayerDiscriminator()
    # conv 3->64 (+bias), conv 64->128 + BN, conv 128->256 + BN, conv 256->512 (s1) + BN, conv 512->1 (+bias)
    expected = (3 * 64 * 16 + 64) + (64 * 128 * 16 + 256) + (128 * 256 * 16 + 512) + (256 * 512 * 16 + 1024) + 8193
    assert sum(p.numel() for p in d.parameters()) == expected == 2_765_633
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_discriminator_bad_input():
    with pytest.raises(ValueError, match="norm='instance'"):
        DiscConfig(norm="instance")
    with pytest.raises(ValueError, match="layers=0: must be >= 1"):
        DiscConfig(layers=0)
    d = NLayerDiscriminator(width=8, n_layers=3)
    with pytest.raises(ValueError, match="smaller than 24 px"):
        d(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        d(torch.zeros(1, 4, 64, 64))


# LossConfig -------------------------------------------------------------------------------------------


def test_loss_config_from_recipe_dict():
    cfg = build(LossConfig, {"l1": 1, "lpips": 0.25, "gan": 0.5, "disc": {"layers": 3, "width": 64}, "gan_start": 10})
    assert cfg.disc == DiscConfig(layers=3, width=64, norm="batch")
    assert build(LossConfig, dataclasses.asdict(cfg)) == cfg
    assert build(LossConfig, {}) == LossConfig()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["lpips_weight=1.0"], "loss.lpips_weight: not a config key; did you mean phases.p1.loss.lpips"),
        (["disc.channels=64"], "loss.disc.channels: not a config key"),
        (["gan_loss=wasserstein"], "loss.gan_loss='wasserstein'"),
        (["lpips_net=squeeze"], "loss.lpips_net='squeeze'"),
        (["l1=-1.0"], r"loss.l1=-1.0: must be a finite number >= 0"),
        (["gan=abc"], "loss.gan=abc: expected float"),
        (["l1=0", "lpips=0"], "loss.l1=0.0: phases.p1.loss.l1, phases.p1.loss.l2 and phases.p1.loss.lpips are all 0"),
        (["disc_start=10", "gan_start=5"], r"loss.gan_start=5: < phases.p1.loss.disc_start=10"),
        (["disc_start=-1"], "loss.disc_start=-1"),
        (["disc.norm=layer"], "loss.disc.norm='layer'"),
        (["disc=3"], "loss.disc=3"),
        (["adaptive_weight=maybe"], "loss.adaptive_weight=maybe: expected bool"),
    ],
)
def test_loss_config_errors_name_the_key(overrides, match):
    with pytest.raises(ValueError, match=f"phases.p1.{match}"):  # through the schema: the full key
        to_config(compose([f"phases.p1.loss.{o}" for o in overrides]))


# AutoencoderLoss --------------------------------------------------------------------------------------


def test_only_the_discriminator_is_trainable(gan_loss):
    trainable = {id(p) for p in gan_loss.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gan_loss.discriminator.parameters()}
    assert all(not p.requires_grad for p in gan_loss.perceptual.parameters())
    assert gan_loss.perceptual.pretrained is False


def test_no_discriminator_and_no_lpips_when_weights_are_zero():
    loss = AutoencoderLoss(LossConfig(l1=1.0, lpips=0.0))
    assert loss.discriminator is None and loss.perceptual is None
    assert list(loss.parameters()) == []
    x = images()
    assert loss.discriminator_loss(x, x, step=10**6) == (None, {})
    _, logs = loss.generator_loss(x, x * 0.5, step=10**6)
    assert set(logs) == {"loss_l1", "loss_l2", "loss_rec", "loss_total"}


def test_adversarial_term_absent_before_gan_start(gan_loss, monkeypatch):
    head, x = TinyDecoderHead(), images()
    calls = []
    handle = gan_loss.discriminator.register_forward_hook(lambda *a: calls.append(1))
    try:
        loss, logs = gan_loss.generator_loss(x, head(x), step=4, last_layer=head.conv.weight)
    finally:
        handle.remove()
    assert calls == []  # D is not even run for G before gan_start
    assert "loss_gan" not in logs and "adaptive_weight" not in logs
    assert torch.equal(logs["loss_total"], logs["loss_rec"])
    assert torch.allclose(loss.detach(), logs["loss_l1"] + 0.5 * logs["loss_lpips"])


def test_generator_loss_with_gan_matches_its_terms(gan_loss):
    head, x = TinyDecoderHead(), images()
    x_hat = head(x)
    loss, logs = gan_loss.generator_loss(x, x_hat, step=5, last_layer=head.conv.weight)
    assert {"loss_l1", "loss_l2", "loss_lpips", "loss_rec", "loss_gan", "adaptive_weight", "gan_weight"} <= set(logs)
    assert all(not v.requires_grad and "/" not in k for k, v in logs.items())
    # the weight is the hand-computed ratio of gradient norms at the last layer, times loss.gan
    w = head.conv.weight
    rec = logs["loss_rec"]
    assert torch.allclose(logs["gan_weight"], 0.5 * logs["adaptive_weight"])
    assert torch.allclose(loss.detach(), rec + logs["gan_weight"] * logs["loss_gan"], rtol=1e-5)
    loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_generator_adaptive_weight_by_hand():
    cfg = LossConfig(l1=1.0, lpips=0.0, gan=0.1, disc=SMALL_DISC)
    loss_fn, head, x = AutoencoderLoss(cfg), TinyDecoderHead(), images()
    x_hat = head(x)
    _, logs = loss_fn.generator_loss(x, x_hat, step=0, last_layer=head.conv.weight)
    rec = (x_hat - x).abs().mean()
    g = -loss_fn.discriminator(x_hat).mean()
    (gr,) = torch.autograd.grad(rec, head.conv.weight, retain_graph=True)
    (gg,) = torch.autograd.grad(g, head.conv.weight)
    assert logs["adaptive_weight"].item() == pytest.approx((gr.norm() / (gg.norm() + 1e-4)).item(), rel=1e-4)


def test_single_backward_adaptive_loss_equals_textbook_gradients(gan_loss):
    """generator_loss backpropagates LPIPS and D once each; lambda and every gradient equal the textbook
    computation (grads at the last layer, then a backward of rec + gan * lambda * g)."""
    torch.manual_seed(0)
    body, head, x = nn.Conv2d(3, 3, 3, padding=1), TinyDecoderHead(), images()
    params = [*body.parameters(), *head.parameters()]
    loss, logs = gan_loss.generator_loss(x, head(body(x)), step=5, last_layer=head.conv.weight)
    ours = torch.autograd.grad(loss, params)

    x_hat = head(body(x))
    rec, _ = gan_loss.reconstruction_loss(x, x_hat)
    g = -gan_loss.discriminator(x_hat).mean()
    lam = adaptive_weight(rec, g, head.conv.weight)
    total = rec + 0.5 * lam * g
    ref = torch.autograd.grad(total, params)
    assert logs["adaptive_weight"].item() == pytest.approx(lam.item(), rel=1e-5)
    assert loss.item() == pytest.approx(total.item(), rel=1e-6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in gan_loss.discriminator.parameters())


def test_fixed_gan_weight_and_missing_last_layer():
    x, head = images(), TinyDecoderHead()
    fixed = AutoencoderLoss(LossConfig(lpips=0.0, gan=0.1, adaptive_weight=False, disc=SMALL_DISC))
    loss, logs = fixed.generator_loss(x, head(x), step=0)
    assert logs["adaptive_weight"].item() == 1.0
    assert torch.allclose(loss.detach(), logs["loss_rec"] + 0.1 * logs["loss_gan"])
    adaptive = AutoencoderLoss(LossConfig(lpips=0.0, gan=0.1, disc=SMALL_DISC))
    with pytest.raises(ValueError, match="needs last_layer="):
        adaptive.generator_loss(x, head(x), step=0)


def test_discriminator_loss_none_before_disc_start(gan_loss):
    x = images()
    assert gan_loss.discriminator_loss(x, x, step=1) == (None, {})


def test_discriminator_loss_trains_only_d(gan_loss):
    head, x = TinyDecoderHead(), images()
    x_hat = head(x)
    d_loss, logs = gan_loss.discriminator_loss(x, x_hat, step=2)
    assert set(logs) == {"loss_disc", "logits_real", "logits_fake", "disc_accuracy", "loss_disc_total"}
    assert d_loss.dtype == torch.float32 and torch.isfinite(d_loss)
    gan_loss.discriminator.zero_grad()
    d_loss.backward()
    assert head.conv.weight.grad is None  # x_hat is detached inside
    grads = [p.grad for p in gan_loss.discriminator.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bf16_autocast_gives_fp32_finite_losses(gan_loss):
    head, x = TinyDecoderHead(), images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat = head(x)
        assert x_hat.dtype == torch.bfloat16
        loss, logs = gan_loss.generator_loss(x, x_hat, step=5, last_layer=head.conv.weight)
        d_loss, _ = gan_loss.discriminator_loss(x, x_hat, step=5)
    for t in (loss, d_loss, *logs.values()):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    loss.backward()
    assert torch.isfinite(head.conv.weight.grad).all()


def test_a_few_steps_reduce_the_reconstruction_loss():
    # Sanity of weights and gradients together: a few Adam steps on the head lower L1 + LPIPS.
    torch.manual_seed(0)
    loss_fn = AutoencoderLoss(LossConfig(l1=1.0, lpips=0.25, lpips_net="alex"), lpips_pretrained=False)
    head, x = TinyDecoderHead(), images(2, 32)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    first = None
    for _ in range(10):
        loss, _ = loss_fn.generator_loss(x, head(x), step=0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.8 * first, (first, loss.item())


# GPU ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_bf16_phase3_losses_are_fp32_and_finite():
    # The phase-3 setting at its real size: VGG LPIPS + the taming PatchGAN, 256 px, bf16 autocast on CUDA.
    dev = torch.device("cuda")
    cfg = LossConfig(l1=1.0, lpips=1.0, gan=0.5, disc=DiscConfig(layers=3, width=64))
    loss_fn = AutoencoderLoss(cfg, lpips_pretrained=False).to(dev)
    head, x = TinyDecoderHead().to(dev), images(4, 256).to(dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x_hat = head(x)
        loss, logs = loss_fn.generator_loss(x, x_hat, step=0, last_layer=head.conv.weight)
        lpips_bf16 = loss_fn.perceptual(x_hat, x)
        d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step=0)
    for t in (loss, d_loss, lpips_bf16, *logs.values(), *d_logs.values()):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # LPIPS inside autocast is the fp32 value of the same (bf16) inputs
    assert torch.allclose(lpips_bf16, loss_fn.perceptual(x_hat.float(), x), rtol=1e-4)
    loss.backward()
    assert torch.isfinite(head.conv.weight.grad).all()
    loss_fn.discriminator.zero_grad()
    d_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in loss_fn.discriminator.parameters())
