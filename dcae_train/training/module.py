"""AutoencoderModule: the LightningModule that routes one phase of the DC-AE recipe.

One training step = one batch: the autoencoder is updated once and, once the discriminator has started,
the discriminator once. Manual optimization throughout, so every phase follows the same path.
`trainer.global_step` counts autoencoder updates only (the discriminator's optimizer is stepped without
Lightning's counter), so `max_steps`, checkpoint and log intervals count batches, not optimizer calls
(Lightning #17958 doubles them otherwise).

The parts own their structure: the model knows its frozen-prefix forward and its last trainable layer
(`DCAE.reconstruct`, `DCAE.last_trainable_layer`), the loss owns LPIPS and the discriminator, `optim.py`
builds optimizers and schedules, `nonfinite.py` counts skipped steps. This module only routes.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch

from dcae_train.evaluation.metrics import psnr_per_image, to_uint8
from dcae_train.losses import AutoencoderLoss
from dcae_train.models import DCAE
from dcae_train.training.checkpoint import rng_state, set_rng_state
from dcae_train.training.config import OptimizerConfig, PhaseConfig
from dcae_train.training.datamodule import ImageDataModule
from dcae_train.training.ema import EMA
from dcae_train.training.gan_health import CollapseGuard
from dcae_train.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from dcae_train.training.optim import build_adamw, build_schedule, clip_grad_norm, is_fused
from dcae_train.training.phases import freeze_all_but, select_trainable, set_frozen_norms_eval
from dcae_train.training.prefixes import sample_prefixes
from dcae_train.weights.checkpoint import META_KEY, RNG_KEY, CheckpointMeta

__all__ = ["AutoencoderModule", "NonFiniteLossError"]


class AutoencoderModule(L.LightningModule):
    def __init__(
        self,
        model: DCAE,
        loss: AutoencoderLoss,
        phase: PhaseConfig,
        *,
        meta: CheckpointMeta,
        max_nonfinite_steps: int = 20,
        channels_last: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # LPIPS and foundation weights are not saved in our checkpoints (they come from their weight files).
        self.strict_loading = False
        self.model = model
        self.loss = loss
        self.phase = phase
        self.meta = meta  # recorded in every checkpoint as ckpt["dcae"]
        self.channels_last = channels_last
        self.seed = seed  # with the step and the rank, it draws the latent prefixes a step trains on

        self.trainable_names = select_trainable(model, phase.trainable, key=f"phases.p{meta.phase}.trainable")
        freeze_all_but(model, self.trainable_names)
        if loss.vf is not None and not model.encoder_last_layer().requires_grad:
            raise ValueError(
                f"phases.p{meta.phase}.loss.vf.weight={phase.loss.vf.weight}: the VF loss shapes the latent, but the "
                "encoder's last layer (encoder.conv_out) does not train in this phase; add it to "
                f"phases.p{meta.phase}.trainable or set phases.p{meta.phase}.loss.vf.weight=0"
            )
        guard = phase.loss.collapse
        self.collapse = CollapseGuard(guard) if loss.discriminator is not None and guard.steps > 0 else None
        self.ema_helper = EMA(phase.ema.decay, phase.ema.warmup_steps) if phase.ema.enabled else None
        self.ema = EMA.make_copy(model) if self.ema_helper else None
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps, flush_every=min(phase.log_every, max_nonfinite_steps))
        self._t_last: float | None = None
        self.inject_nan_loss = False  # set by the chaos-test FaultInjection callback only
        self._hidden: list[torch.Tensor] = []  # the REPA stage's outputs of this step (after the EMA copy: not copied)
        if loss.repa is not None:
            self._hook_repa_stage(phase)

    def _hook_repa_stage(self, phase: PhaseConfig) -> None:
        r, key = phase.loss.repa, f"phases.p{self.meta.phase}.loss.repa"
        stage = self.model.feature_module(r.where, r.stage)
        if not any(p.requires_grad for p in stage.parameters()):
            raise ValueError(
                f"{key}.weight={r.weight}: {r.where} stage {r.stage} does not train in this phase, so the alignment "
                f"would train only its projector; pick a trained stage ({key}.stage) or set {key}.weight=0"
            )
        stage.register_forward_hook(self._capture_hidden)

    def _capture_hidden(self, module, inputs, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training passes only; validation and the EMA never reach here
            self._hidden.append(output)

    # Frozen parts stay frozen -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        set_frozen_norms_eval(self.model)
        if self.ema is not None:
            self.ema.eval()
        return self

    # Optimizers -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        generator = [*self.model.parameters(), *self.loss.generator_parameters()]  # + the VF projector
        pairs = [_optimizer_and_schedule(generator, self.phase.optimizer, self.phase.max_steps)]
        if self.loss.discriminator is not None:
            disc = self.loss.discriminator.parameters()
            pairs.append(_optimizer_and_schedule(disc, self.phase.disc_optimizer, self.phase.max_steps))
        return [o for o, _ in pairs], [s for _, s in pairs]

    # Training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self._prepare(batch["image"])
        step = self.global_step
        opts, scheds = _as_list(self.optimizers()), _as_list(self.lr_schedulers())

        prefixes = sample_prefixes(self.phase.latent_prefixes, seed=self.seed, step=step, rank=self.global_rank)
        with self.toggled_optimizer(opts[0]):
            zs, x_hats = self.model.reconstruct(x, prefixes)
            loss, logs = self._generator_loss(x, zs, x_hats, step)
            if self.inject_nan_loss:
                loss, self.inject_nan_loss = loss * float("nan"), False
            grad_norm = self._guarded_step(opts[0], loss, self.phase.optimizer, opts[0].step, step, logs)
        if grad_norm is None:  # skipped on the host: no schedule, discriminator, EMA or step count this batch
            self._emit({"train/skipped": 1.0, "train/nonfinite_steps": float(self.nonfinite.total)}, step)
            return
        scheds[0].step()
        logs["grad_norm"] = grad_norm.detach()

        if len(opts) > 1:
            fakes = x_hats[0] if len(x_hats) == 1 else torch.cat(x_hats)  # every prefix's reconstruction is a fake
            logs.update(self._discriminator_step(opts[1], scheds[1], x, fakes.detach(), step))
        if self.ema is not None and (step + 1) % self.phase.ema.every == 0:
            self.ema_helper.update(self.ema, self.model, step + 1)
        if (step + 1) % self.phase.log_every == 0 or step == 0:
            if prefixes:
                logs["latent_prefix_channels"] = torch.tensor(float(sum(prefixes)) / len(prefixes))
            self._log_train(logs, zs[-1], x, opts[0], step)

    def _generator_loss(self, x, zs: list, x_hats: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict]:
        hidden, self._hidden = self._hidden, []
        return generator_loss(self.model, self.loss, x, zs, x_hats, step=step, hidden=hidden)

    def _discriminator_step(self, opt_d, sched_d, x, x_hat, step: int) -> dict[str, torch.Tensor]:
        with self.toggled_optimizer(opt_d):
            opt_d.zero_grad(set_to_none=True)  # the generator's backward reached D's parameters
            d_loss, d_logs = self.loss.discriminator_loss(x, x_hat, step=step)
            if d_loss is None:  # before disc_start
                return d_logs
            # The raw optimizer's step: Lightning would count this one in global_step (see the module docstring).
            d_norm = self._guarded_step(opt_d, d_loss, self.phase.disc_optimizer, opt_d.optimizer.step, step)
        sched_d.step()
        if self.collapse is not None:
            acc = d_logs["disc_accuracy"]
            if self.trainer.world_size > 1:  # every rank must take the same decision
                acc = self.trainer.strategy.reduce(acc, reduce_op="mean")
            if self.collapse.update(acc):
                self._on_collapse(opt_d, step)
            d_logs["collapse_trips"] = self.collapse.trips.float()
        return {**d_logs, "grad_norm_disc": d_norm.detach()} if d_norm is not None else d_logs

    def _on_collapse(self, opt_d, step: int) -> None:
        """The collapse guard tripped: end the run, or start the adversarial game over with a fresh D."""
        cfg = self.phase.loss.collapse
        what = f"collapse guard: D accuracy above {cfg.accuracy} for {cfg.steps} steps in a row at step {step}"
        if cfg.action == "stop":
            self.trainer.should_stop = True  # the final checkpoint is still written
            self.print(f"warning: {what}; stopping the run (loss.collapse.action=stop)")
            return
        self.loss.reset_discriminator(step)
        opt_d.optimizer.state.clear()  # the old D's Adam moments would push the fresh one
        resume = int(self.loss.gan_pause_until)
        self.print(f"warning: {what}; discriminator reset, the generator sees it again from step {resume}")

    def _guarded_step(
        self, opt, loss: torch.Tensor, cfg: OptimizerConfig, step_fn: Callable[[], Any], step: int, logs=None
    ) -> torch.Tensor | None:
        """Backward, clip, and step unless the loss or the gradient norm is non-finite; the gradient norm, or None
        for a generator step found non-finite on the host. A fused optimizer skips such a step inside its kernel
        (`found_inf`) and the guard counts it on the device: no host sync. Only generator steps (`logs` given)
        count towards trainer.max_nonfinite_steps; a non-finite discriminator step is just skipped."""
        self.manual_backward(loss)
        raw = opt.optimizer
        grad_norm = clip_grad_norm(raw, cfg.grad_clip)
        ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
        counted, skipped = logs is not None, False
        if is_fused(raw):
            raw.found_inf = (~ok).float()
            step_fn()
            raw.found_inf = None
            if counted:
                self._warn_nonfinite(self.nonfinite.on_device(ok, step))
        elif bool(ok):
            step_fn()
            if counted:
                self.nonfinite.reset()
        else:
            skipped = True
            if counted:
                self._warn_nonfinite(self.nonfinite.on_host(step, _describe(loss, grad_norm, logs)))
        opt.zero_grad(set_to_none=True)
        return None if skipped and counted else grad_norm

    def _warn_nonfinite(self, message: str | None) -> None:
        if message:
            self.print(f"warning: {message}")

    def _emit(self, metrics: dict[str, Any], step: int) -> None:
        """Training metrics straight to the loggers, at the true step (the update's index). Not through
        `self.log`: Lightning steps its logging by batches (skipped ones too) and re-emits the last logged
        values at its own cadence, so a non-finite streak would repeat the last good loss under drifting steps."""
        values = {k: float(v) for k, v in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=step)
            logger.save()  # as Lightning does after each log: a killed run keeps the rows it logged

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _log_train(self, logs: dict[str, Any], z: torch.Tensor, x: torch.Tensor, opt_g, step: int) -> None:
        out = {f"train/{k}": v for k, v in logs.items()}
        zf = z.detach().float()
        out["train/latent_mean"] = zf.mean()
        out["train/latent_rms"] = zf.pow(2).mean().sqrt()
        out["train/lr"] = opt_g.param_groups[0]["lr"]
        out["train/nonfinite_steps"] = float(self.nonfinite.total)
        now = time.perf_counter()
        if self._t_last is not None:
            batches = self.phase.log_every if self.global_step > 1 else 1
            out["train/images_per_s"] = batches * x.shape[0] * self.trainer.world_size / max(now - self._t_last, 1e-9)
        self._t_last = now
        out["train/peak_memory_gib"] = _peak_memory_gib(x.device)
        if isinstance(self.trainer.datamodule, ImageDataModule):  # benchmarks feed a plain DataLoader
            out["train/data_skipped"] = float(self.trainer.datamodule.skipped_samples())
        self._emit(out, step)
        self.log("loss", logs["loss_total"], prog_bar=True, on_step=True, logger=False, batch_size=x.shape[0])

    # Validation -------------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self._prepare(batch["image"])
        for tag, model in (("val", self.model), ("val_ema", self.ema)):
            if model is None:
                continue
            x_hat = model(x).float()
            metrics = self.reconstruction_metrics(x.float(), x_hat)
            logs = {f"{tag}/{k}": v for k, v in metrics.items()}
            self.log_dict(logs, on_step=False, on_epoch=True, batch_size=x.shape[0])

    def reconstruction_metrics(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The phase's reconstruction loss (L1/L2 + LPIPS at the recipe weights) and PSNR on uint8."""
        _, out = self.loss.reconstruction_loss(x, x_hat)
        out["psnr"] = psnr_per_image(to_uint8(x), to_uint8(x_hat)).mean()
        return out

    # Checkpoint contents ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Everything we train (autoencoder, EMA, discriminator, VF projector); not the frozen LPIPS, foundation
        and DINO-discriminator trunk nets, which come from their weight files."""
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        frozen = (f"{prefix}loss.perceptual.", f"{prefix}loss.foundation.", f"{prefix}loss.discriminator.trunk.")
        for key in [k for k in sd if k.startswith(frozen)]:
            del sd[key]
        return sd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        step = int(self.global_step)
        message = self.nonfinite.flush(step)
        if message:
            self.print(f"warning: {message}")
        checkpoint[META_KEY] = dataclasses.replace(self.meta, step=step, nonfinite_total=self.nonfinite.total).to_dict()
        checkpoint[RNG_KEY] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.total = CheckpointMeta.from_dict(checkpoint[META_KEY]).nonfinite_total
        if RNG_KEY in checkpoint:
            set_rng_state(checkpoint[RNG_KEY])


def generator_loss(
    model: DCAE,
    loss: AutoencoderLoss,
    x: torch.Tensor,
    zs: list,
    x_hats: list[torch.Tensor],
    *,
    step: int,
    hidden: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, dict]:
    """The phase's generator loss, averaged over the reconstructions of the step's latent prefixes [ours]:
    DC-Gen's autoencoder loss is not published; the unweighted mean is what its diffusion trainer does over
    prefixes, and it gives every prefix the gradient scale of a whole phase. `hidden`: the REPA stage's outputs of
    this step. A function of its own, so the cost command (`dcae_train.cost.train_step`) runs this very code."""
    last = model.last_trainable_layer() if loss.gan_active(step) else None
    extra: dict[str, Any] = {}
    if loss.foundation is not None:  # the foundation features of x once, for every prefix and loss
        extra["features"] = loss.foundation_features(x, tuple(zs[0].shape[-2:]))
    if loss.vf is not None:
        extra["encoder_last_layer"] = model.encoder_last_layer()
    hidden = list(hidden)
    if loss.repa is not None and len(hidden) == 1:
        hidden = hidden * len(x_hats)  # an encoder stage: one body pass for every prefix
    parts = [
        loss.generator_loss(x, x_hat, step=step, last_layer=last, z=z, hidden=hidden[i] if hidden else None, **extra)
        for i, (z, x_hat) in enumerate(zip(zs, x_hats, strict=True))
    ]
    if len(parts) == 1:
        return parts[0]
    total = torch.stack([p[0] for p in parts]).mean()
    return total, {k: torch.stack([p[1][k] for p in parts]).mean() for k in parts[0][1]}


def _optimizer_and_schedule(params, cfg: OptimizerConfig, max_steps: int):
    opt = build_adamw([p for p in params if p.requires_grad], cfg)
    return opt, build_schedule(opt, cfg, max_steps)


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _describe(loss: torch.Tensor, grad_norm: torch.Tensor, logs: dict[str, Any]) -> str:
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1)
    return f"loss={loss.detach().item():.4g}, grad_norm={grad_norm.item():.4g}; {terms}"


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
