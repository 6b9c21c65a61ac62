"""AutoencoderLoss: the loss of one phase of the DC-AE recipe. It owns the LPIPS net and the PatchGAN discriminator.

    generator:     L = l1 * |x_hat - x| + l2 * (x_hat - x)^2 + lpips * LPIPS(x_hat, x)          (= L_rec)
                       + gan * lambda * L_G(D(x_hat))                   from step gan_start on (phase 3)
                       + vf.weight * lambda_vf * L_VF(P z, DINOv2(x))   vf.weight > 0 (dcae_train/losses/alignment.py)
    discriminator: L_D(D(T x), D(T sg(x_hat)))                          from step disc_start on
                       + lecam * R_LC + r1 / 2 * R1 (every r1_every steps, x r1_every)  (regularizers.py)

T is DiffAugment (`diffaug.policy`, the identity when empty), also applied to x_hat in the generator's term.

lambda is the adaptive weight ||grad L_rec|| / ||grad L_G|| at the decoder's last layer (taming/LDM), or 1;
lambda_vf the same ratio for L_VF at the encoder's last layer (VA-VAE), or 1.
Two start steps, because the peers that switch D and G on together see reconstructions degrade while D is still
random (taming #20, #44; docs/recipe.md, "Lessons from other trainers"): D can warm up first. Before `gan_start`
the adversarial term is not just zero-weighted: D is not run for the generator at all. `step` is the caller's batch
counter (the trainer passes its autoencoder-update count, not Lightning's doubled global_step).
"""

from __future__ import annotations

import torch
from torch import nn

from dcae_train.losses.alignment import RepaLoss, VFLoss
from dcae_train.losses.augment import DiffAugment
from dcae_train.losses.config import FoundationConfig, LossConfig, PerceptualConfig
from dcae_train.losses.dino_discriminator import DinoDiscriminator
from dcae_train.losses.discriminator import NLayerDiscriminator
from dcae_train.losses.foundation import FoundationModel
from dcae_train.losses.gan import adaptive_weight, d_loss_fn, g_loss_fn
from dcae_train.losses.perceptual import LPIPS
from dcae_train.losses.reconstruction import l1_loss, l2_loss
from dcae_train.losses.regularizers import LeCAM, r1_penalty


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of one phase. Trainable: the discriminator (its own optimizer) and the
    VF projector (`generator_parameters()`, trained with the autoencoder); LPIPS and the foundation model are frozen."""

    def __init__(
        self,
        config: LossConfig,
        perceptual: PerceptualConfig | None = None,
        *,
        lpips_pretrained: bool = True,
        foundation: FoundationConfig | None = None,
        latent_channels: int | None = None,
        foundation_pretrained: bool = True,
        repa_channels: int | None = None,
        shapes_only: bool = False,
    ) -> None:
        """`perceptual`: where the LPIPS trunk comes from (default: required, downloaded when missing);
        `lpips_pretrained=False`: a random trunk that never touches the cache or the network (tests).
        `foundation`, `latent_channels`: the DINOv2 and the latent width of the VF loss (needed when vf.weight > 0);
        `foundation_pretrained=False`: random foundation weights that never touch the cache (tests).
        `repa_channels`: channels of the aligned feature (needed when repa.weight > 0).
        `shapes_only=True`: built inside the caller's FakeTensorMode for cost estimates (see `LPIPS`)."""
        super().__init__()
        self.config = config
        self.perceptual: LPIPS | None = None
        if config.lpips > 0:
            p = perceptual or PerceptualConfig()
            self.perceptual = LPIPS(
                config.lpips_net,
                pretrained=lpips_pretrained,
                require_pretrained=p.require_pretrained,
                allow_download=p.allow_download,
                shapes_only=shapes_only,
            )
        self.discriminator: NLayerDiscriminator | DinoDiscriminator | None = None
        if config.gan > 0:
            self.discriminator = _build_discriminator(config, foundation, foundation_pretrained, shapes_only)
        self.foundation: FoundationModel | None = None
        self.vf: VFLoss | None = None
        self.repa: RepaLoss | None = None
        if config.vf.enabled or config.repa.enabled:  # one foundation model (and one forward) for both
            fcfg = foundation or FoundationConfig()
            self.foundation = FoundationModel.from_config(
                fcfg, pretrained=foundation_pretrained, shapes_only=shapes_only
            )
        if config.vf.enabled:
            if latent_channels is None:
                raise ValueError(
                    "AutoencoderLoss: loss.vf.weight > 0 needs latent_channels= (the model's latent width)"
                )
            self.vf = VFLoss(config.vf, latent_channels, self.foundation.dim)
        if config.repa.enabled:
            if repa_channels is None:
                raise ValueError("AutoencoderLoss: loss.repa.weight > 0 needs repa_channels= (the feature's width)")
            self.repa = RepaLoss(config.repa, repa_channels, self.foundation.dim)
        if self.discriminator is not None:  # the step before which G does not see D (the collapse guard moves it)
            self.register_buffer("gan_pause_until", torch.zeros((), dtype=torch.long))
        self.augment = DiffAugment(config.diffaug) if config.diffaug.policy else None
        self.lecam = LeCAM(config.lecam_decay) if config.gan > 0 and config.lecam > 0 else None
        self._d_loss = d_loss_fn(config.gan_loss)
        self._g_loss = g_loss_fn(config.gan_loss)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Loss parameters trained with the autoencoder (by its optimizer): the VF and REPA projectors."""
        return [p for m in (self.vf, self.repa) if m is not None for p in m.parameters()]

    def foundation_features(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor | None:
        """The frozen foundation features of `x` on the latent grid (B, D, h, w), or None without a VF loss."""
        return self.foundation(x, grid) if self.foundation is not None else None

    def gan_active(self, step: int) -> bool:
        """Whether the generator gets the adversarial term at `step` (after gan_start, and after the re-warm-up of
        a discriminator the collapse guard reset)."""
        if self.discriminator is None:
            return False
        return step >= self.config.gan_start and step >= int(self.gan_pause_until)

    def reset_discriminator(self, step: int) -> None:
        """Start the adversarial game over (the collapse guard's `reset`): a freshly initialised D (and LeCAM EMAs)
        that warms up for gan_start - disc_start steps before G sees it again."""
        assert self.discriminator is not None
        self.discriminator.reset_parameters(seed=step)  # the same fresh D on every rank
        if self.lecam is not None:
            self.lecam.ema_real.zero_()
            self.lecam.ema_fake.zero_()
        self.gan_pause_until.fill_(step + 1 + self.config.gan_start - self.config.disc_start)

    def disc_active(self, step: int) -> bool:
        """Whether the discriminator trains at `step`."""
        return self.discriminator is not None and step >= self.config.disc_start

    def reconstruction_loss(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_rec = l1 * L1 + l2 * L2 + lpips * LPIPS in fp32, and its detached terms."""
        cfg = self.config
        logs = {"loss_l1": l1_loss(x_hat, x), "loss_l2": l2_loss(x_hat, x)}
        rec = cfg.l1 * logs["loss_l1"] + cfg.l2 * logs["loss_l2"]
        if self.perceptual is not None:
            logs["loss_lpips"] = self.perceptual(x_hat, x)
            rec = rec + cfg.lpips * logs["loss_lpips"]
        logs["loss_rec"] = rec
        return rec, {k: v.detach() for k, v in logs.items()}

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        *,
        step: int,
        last_layer: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        encoder_last_layer: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The autoencoder's loss at `step` (0-dim fp32) and detached logs.

        `last_layer`: the weight of the decoder's last trainable layer, needed for the adaptive weight once the
        adversarial term is on. The caller must keep D's parameters out of this backward (Lightning's
        `toggled_optimizer` does) or zero D's gradients before the discriminator step.
        With a VF loss: `z`, the latent x_hat was decoded from; `encoder_last_layer`, the weight of the encoder's
        last conv (the adaptive VF weight); `features`, the foundation features of x if already computed.
        With a REPA loss: `hidden`, the aligned stage's output for this reconstruction.
        """
        loss, logs = self.reconstruction_loss(x, x_hat)
        vf_term = None
        if self.vf is not None:  # before the GAN term: its adaptive path frees L_rec's graph
            vf_term, vf_logs = self._vf_term(x, z, loss, encoder_last_layer, features)
            logs.update(vf_logs)
        if self.gan_active(step):
            assert self.discriminator is not None
            fake = self.augment(x_hat) if self.augment is not None else x_hat
            g_loss = self._g_loss(self.discriminator(fake))  # D's parameters are frozen by the caller here
            if self.config.adaptive_weight and x_hat.requires_grad and torch.is_grad_enabled():
                loss, lam = self._adaptive_total(loss, g_loss, x_hat, last_layer)
                logs.update(self._last_norms)  # GAN health: G's adversarial vs reconstruction gradient at the head
            else:
                lam = self._adaptive_weight(loss, g_loss, last_layer)
                loss = loss + self.config.gan * lam * g_loss
            logs.update(loss_gan=g_loss.detach(), adaptive_weight=lam, gan_weight=self.config.gan * lam)
        if vf_term is not None:
            loss = loss + vf_term
        if self.repa is not None:
            if hidden is None:
                raise ValueError("loss.repa.weight > 0: generator_loss needs hidden= (the aligned stage's output)")
            grid = tuple(z.shape[-2:]) if z is not None else tuple(hidden.shape[-2:])
            feats = features if features is not None else self.foundation_features(x, grid)
            repa, repa_logs = self.repa(hidden, feats)
            logs.update(repa_logs)
            loss = loss + self.config.repa.weight * repa
        logs["loss_total"] = loss.detach()
        return loss, logs

    def _vf_term(self, x, z, rec, encoder_last_layer, features) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """vf.weight * lambda_vf * L_VF and its logs; lambda_vf compares gradients at the encoder's last layer."""
        assert self.vf is not None
        if z is None:
            raise ValueError("loss.vf.weight > 0: generator_loss needs z= (the latent the reconstruction came from)")
        feats = features if features is not None else self.foundation_features(x, tuple(z.shape[-2:]))
        vf, logs = self.vf(z, feats)
        cfg = self.config.vf
        if cfg.adaptive_weight and z.requires_grad and torch.is_grad_enabled():
            if encoder_last_layer is None:
                raise ValueError(
                    "loss.vf.adaptive_weight=true needs encoder_last_layer= (the weight of the encoder's last conv); "
                    "pass it to generator_loss or set loss.vf.adaptive_weight=false"
                )
            lam = adaptive_weight(rec, vf, encoder_last_layer, cfg.max_adaptive_weight)
        else:
            lam = torch.ones((), device=vf.device)
        logs["vf_weight"] = cfg.weight * lam
        return cfg.weight * lam * vf, logs

    def _adaptive_total(self, rec, g_loss, x_hat, last_layer):
        """rec + gan * lambda * g_loss with LPIPS and D backpropagated once each, not twice.

        The textbook adaptive weight takes d rec / d w and d g / d w at the last layer w (each a backward through
        LPIPS or D) and then backpropagates the total loss (through LPIPS and D again). Here the two terms are
        backpropagated to the image x_hat once (g_rec, g_gan); their last-layer gradients come from x_hat's own
        (short) graph; and the returned loss has the value of the total but backpropagates
        g_rec + gan * lambda * g_gan from x_hat. Same lambda, same gradients, one LPIPS and one D backward less.
        """
        if last_layer is None or not last_layer.requires_grad:
            return None, self._adaptive_weight(rec, g_loss, last_layer)  # raises the explanatory error
        g_rec, g_gan = (
            _grad_or_zeros(t, x_hat, retain_graph=False) for t in (rec, g_loss)
        )  # each subgraph is walked once, then freed
        w_rec = _grad_or_zeros(x_hat, last_layer, grad_outputs=g_rec, retain_graph=True)
        w_gan = _grad_or_zeros(x_hat, last_layer, grad_outputs=g_gan, retain_graph=True)
        norm = torch.linalg.vector_norm
        n_rec, n_gan = norm(w_rec, dtype=torch.float32), norm(w_gan, dtype=torch.float32)
        lam = (n_rec / (n_gan + 1e-4)).clamp(0.0, self.config.max_adaptive_weight).detach()
        self._last_norms = {"grad_norm_rec_last": n_rec.detach(), "grad_norm_gan_last": n_gan.detach()}
        coef = self.config.gan * lam
        surrogate = (x_hat * (g_rec + coef.to(g_gan.dtype) * g_gan).to(x_hat.dtype)).float().sum()
        value = (rec.detach() + coef * g_loss.detach()).float()
        return surrogate - surrogate.detach() + value, lam

    def _adaptive_weight(self, rec: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None):
        """lambda (detached 0-dim fp32): the adaptive ratio, or 1 with adaptive_weight=false."""
        cfg = self.config
        if not cfg.adaptive_weight:
            return torch.ones((), device=rec.device)
        if last_layer is None:
            raise ValueError(
                "loss.adaptive_weight=true needs last_layer= (the weight of the decoder's last trainable conv) "
                "once the GAN term is on; pass it to generator_loss or set loss.adaptive_weight=false"
            )
        return adaptive_weight(rec, g_loss, last_layer, cfg.max_adaptive_weight)

    def discriminator_loss(
        self, x: torch.Tensor, x_hat: torch.Tensor, *, step: int
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """D's loss at `step` (0-dim fp32) and detached logs; (None, {}) without a discriminator or before disc_start.

        Real and fake images go through D in separate calls, so BatchNorm statistics are never mixed (taming).
        """
        if not self.disc_active(step):
            return None, {}
        assert self.discriminator is not None
        cfg = self.config
        real, fake = self._augment_pair(x.detach(), x_hat.detach())
        logits_real = self.discriminator(real).float()
        logits_fake = self.discriminator(fake).float()
        loss = self._d_loss(logits_real, logits_fake)
        logs = {"loss_disc": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        # D's accuracy: the share of patch logits on the right side of 0 (real > 0, fake < 0); near 1 = D wins outright
        logs["disc_accuracy"] = 0.5 * ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean())
        if self.lecam is not None:
            logs["loss_lecam"] = self.lecam(logits_real, logits_fake)
            loss = loss + cfg.lecam * logs["loss_lecam"]
        if cfg.r1 > 0 and step % cfg.r1_every == 0:
            logs["loss_r1"] = r1_penalty(self.discriminator, x)  # at the real images themselves [ours]
            loss = loss + cfg.r1 / 2 * cfg.r1_every * logs["loss_r1"]
        logs["loss_disc_total"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def _augment_pair(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.augment is None:
            return x, x_hat
        if self.config.diffaug.paired:
            return self.augment.pair(x, x_hat)
        return self.augment(x), self.augment(x_hat)


def _build_discriminator(
    config: LossConfig, foundation: FoundationConfig | None, pretrained: bool, shapes_only: bool = False
) -> nn.Module:
    d = config.disc
    if d.type == "patch":
        return NLayerDiscriminator(3, width=d.width, n_layers=d.layers, norm=d.norm)
    # The trunk's weights follow the run's foundation policy (require_pretrained), from disc.trunk_path or the caches.
    need = (foundation or FoundationConfig()).require_pretrained
    trunk = FoundationModel(
        d.trunk, pretrained=pretrained, path=d.trunk_path, require_pretrained=need, shapes_only=shapes_only
    )
    return DinoDiscriminator(trunk, d.trunk_layers, width=d.width, norm=d.norm, input_size=d.input_size)


def _grad_or_zeros(out, inp, *, grad_outputs=None, retain_graph: bool) -> torch.Tensor:
    """d out / d inp (detached), zeros where `out` does not depend on `inp`."""
    (g,) = torch.autograd.grad(out, inp, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g.detach()
