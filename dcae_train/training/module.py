"""AutoencoderModule: the LightningModule that routes one phase of the DC-AE recipe.

One training step = one batch: the autoencoder is updated once and, once the discriminator has started,
the discriminator once. Manual optimization throughout, so every phase follows the same path.
`trainer.global_step` counts autoencoder updates only (the discriminator's optimizer is stepped without
Lightning's counter), so `max_steps`, checkpoint and log intervals count batches, not optimizer calls
(Lightning #17958 doubles them otherwise).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from dcae_train.training.config import OptimizerConfig, PhaseConfig
from dcae_train.training.ema import EMA
from dcae_train.training.phases import freeze_all_but, is_fully_frozen, select_trainable, set_frozen_norms_eval


class NonFiniteLossError(RuntimeError):
    pass


class AutoencoderModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        phase: PhaseConfig,
        *,
        phase_index: int,
        meta: dict[str, Any],
        max_nonfinite_steps: int = 20,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        # LPIPS weights are not saved in our checkpoints (they come from the lpips package).
        self.strict_loading = False
        self.model = model
        self.loss = loss
        self.phase = phase
        self.phase_index = phase_index
        self.meta = meta  # recorded in every checkpoint as ckpt["dcae"]
        self.max_nonfinite_steps = max_nonfinite_steps
        self.channels_last = channels_last

        self.trainable_names = select_trainable(model, phase.trainable, key=f"phases.p{phase_index}.trainable")
        freeze_all_but(model, self.trainable_names)
        self.ema_helper = EMA(phase.ema.decay, phase.ema.warmup_steps) if phase.ema.enabled else None
        self.ema = EMA.make_copy(model) if self.ema_helper else None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self._nf_run: torch.Tensor | None = None  # fused optimizers: device-side counters, see _count_nonfinite
        self._nf_new: torch.Tensor | None = None
        self._t_last: float | None = None
        self.inject_nan_loss = False  # set by the chaos-test FaultInjection callback only

    # Frozen parts stay frozen -------------------------------------------------------------------------
    def train(self, mode: bool = True):
        super().train(mode)
        set_frozen_norms_eval(self.model)
        if self.ema is not None:
            self.ema.eval()
        return self

    @property
    def last_layer(self) -> torch.Tensor | None:
        """Weight of the last trainable conv of the decoder, for the adaptive GAN weight (looked up once)."""
        if not hasattr(self, "_last_layer_name"):
            named = dict(self.model.named_parameters())
            convs = [n for n in self.trainable_names if n.startswith("decoder.") and named[n].ndim == 4]
            self._last_layer_name = convs[-1] if convs else None
        return self.model.get_parameter(self._last_layer_name) if self._last_layer_name else None

    # Forward with no autograd graph through frozen prefixes ---------------------------------------------
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        enc, dec = self.model.encoder, self.model.decoder
        if is_fully_frozen(enc):
            with torch.no_grad():
                z = self.model.encode(x)
        elif is_fully_frozen_body(enc):
            with torch.no_grad():
                h = enc.forward_body(x)
            z = enc.forward_head(h)
        else:
            z = self.model.encode(x)
        if z.requires_grad or not is_fully_frozen_body(dec):
            x_hat = self.model.decode(z)
        else:
            with torch.no_grad():
                h = dec.forward_body(z)
            x_hat = dec.forward_head(h)
        return z, x_hat

    # Optimizers -------------------------------------------------------------------------------------
    def configure_optimizers(self):
        g_params = [p for p in self.model.parameters() if p.requires_grad]
        opt_g = _adamw(self.model, g_params, self.phase.optimizer)
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _lr_lambda(self.phase.optimizer, self.phase.max_steps))
        disc = getattr(self.loss, "discriminator", None)
        if disc is None:
            return [opt_g], [sched_g]
        opt_d = _adamw(disc, [p for p in disc.parameters() if p.requires_grad], self.phase.disc_optimizer)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _lr_lambda(self.phase.disc_optimizer, self.phase.max_steps))
        return [opt_g, opt_d], [sched_g, sched_d]

    # Training ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = self._prepare(batch["image"])
        step = self.global_step
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        scheds = self.lr_schedulers()
        scheds = scheds if isinstance(scheds, list) else [scheds]
        opt_g, sched_g = opts[0], scheds[0]

        with self.toggled_optimizer(opt_g):
            z, x_hat = self.reconstruct(x)
            last = self.last_layer if self.loss.gan_active(step) else None
            loss, logs = self.loss.generator_loss(x, x_hat, step=step, last_layer=last)
            if self.inject_nan_loss:
                loss, self.inject_nan_loss = loss * float("nan"), False
            self.manual_backward(loss)
            grad_norm = _clip(opt_g, self.phase.optimizer.grad_clip)
            if _fused(opt_g):  # no host sync: the fused kernel skips a non-finite step on the device
                ok = torch.isfinite(loss.detach()) & torch.isfinite(grad_norm)
                opt_g.optimizer.found_inf = (~ok).float()
                opt_g.step()
                opt_g.optimizer.found_inf = None
                self._count_nonfinite(ok, step)
            elif not self._finite(loss, grad_norm, logs, step):
                opt_g.zero_grad(set_to_none=True)
                return
            else:
                opt_g.step()
            opt_g.zero_grad(set_to_none=True)
        sched_g.step()
        logs["grad_norm"] = grad_norm.detach()

        if len(opts) > 1:
            logs.update(self._discriminator_step(opts[1], scheds[1], x, x_hat.detach(), step))
        if self.ema is not None and (step + 1) % self.phase.ema.every == 0:
            self.ema_helper.update(self.ema, self.model, step + 1)
        if (step + 1) % self.phase.log_every == 0 or step == 0:
            self._log_train(logs, z, x, opt_g)

    def _discriminator_step(self, opt_d, sched_d, x, x_hat, step: int) -> dict[str, torch.Tensor]:
        with self.toggled_optimizer(opt_d):
            opt_d.zero_grad(set_to_none=True)  # the generator's backward reached D's parameters
            d_loss, d_logs = self.loss.discriminator_loss(x, x_hat, step=step)
            if d_loss is None:  # before disc_start
                return d_logs or {}
            self.manual_backward(d_loss)
            d_norm = _clip(opt_d, self.phase.disc_optimizer.grad_clip)
            # The raw optimizer: Lightning would count this step in global_step (see module docstring).
            if _fused(opt_d):  # skipped on the device when non-finite, no host sync
                opt_d.optimizer.found_inf = (~(torch.isfinite(d_norm) & torch.isfinite(d_loss.detach()))).float()
                opt_d.optimizer.step()
                opt_d.optimizer.found_inf = None
            elif torch.isfinite(d_norm) and torch.isfinite(d_loss):
                opt_d.optimizer.step()
            opt_d.zero_grad(set_to_none=True)
        sched_d.step()
        return {**d_logs, "grad_norm_disc": d_norm.detach()}

    def _finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, logs: dict, step: int) -> bool:
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, batch_size=1)
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in logs.items() if torch.is_tensor(v) and v.numel() == 1)
        msg = (
            f"non-finite loss or gradient at step {step} "
            f"(loss={loss.detach().item():.4g}, grad_norm={grad_norm.item():.4g}; {terms})"
        )
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{msg}: {self.nonfinite_in_a_row} non-finite steps in a row (trainer.max_nonfinite_steps="
                f"{self.max_nonfinite_steps}); stopping. The last good checkpoint is intact: resume=auto continues "
                "from it (lower the learning rate or enable optimizer.grad_clip)."
            )
        self.print(f"warning: {msg}; step skipped ({self.nonfinite_in_a_row} in a row)")
        return False

    def _count_nonfinite(self, ok: torch.Tensor, step: int) -> None:
        """Fused optimizers: count skipped steps on the device; read the counts on the host only every
        `min(log_every, max_nonfinite_steps)` steps (and when a checkpoint is saved), so the step never syncs.
        A skipped step still counts in global_step (its batch is consumed; weights and moments are unchanged)."""
        bad = (~ok).to(torch.int64)
        if self._nf_run is None:
            self._nf_run, self._nf_new = torch.zeros_like(bad), torch.zeros_like(bad)
        self._nf_run = (self._nf_run + 1) * bad  # consecutive non-finite steps, 0 after a good one
        self._nf_new += bad
        if (step + 1) % max(1, min(self.phase.log_every, self.max_nonfinite_steps)) == 0:
            self._flush_nonfinite(step, log=True)

    def _flush_nonfinite(self, step: int, log: bool = False) -> None:
        if self._nf_run is None:
            return
        new, run = int(self._nf_new.item()), int(self._nf_run.item())
        self._nf_new.zero_()
        if not new:
            return
        self.nonfinite_total += new
        if log:
            self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, batch_size=1)
        msg = f"{new} non-finite loss/gradient step(s) skipped on the device up to step {step} ({run} in a row now)"
        if run >= self.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{msg}: >= trainer.max_nonfinite_steps={self.max_nonfinite_steps} in a row; stopping. The last good "
                "checkpoint is intact: resume=auto continues from it (lower the learning rate or enable "
                "optimizer.grad_clip)."
            )
        self.print(f"warning: {msg}")

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _log_train(self, logs: dict[str, Any], z: torch.Tensor, x: torch.Tensor, opt_g) -> None:
        out = {f"train/{k}": v for k, v in logs.items() if torch.is_tensor(v) or isinstance(v, float | int)}
        zf = z.detach().float()
        out["train/latent_mean"] = zf.mean()
        out["train/latent_rms"] = zf.pow(2).mean().sqrt()
        out["train/lr"] = opt_g.param_groups[0]["lr"]
        out["train/nonfinite_steps"] = float(self.nonfinite_total)
        now = time.perf_counter()
        if self._t_last is not None:
            batches = self.phase.log_every if self.global_step > 1 else 1
            out["train/images_per_s"] = batches * x.shape[0] * self.trainer.world_size / max(now - self._t_last, 1e-9)
        self._t_last = now
        out["train/peak_memory_gib"] = _peak_memory_gib(x.device)
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None)
        if callable(skipped):
            out["train/data_skipped"] = float(skipped())
        self.log_dict(out, on_step=True, on_epoch=False, prog_bar=False, batch_size=x.shape[0])
        self.log("loss", logs["loss_total"], prog_bar=True, on_step=True, batch_size=x.shape[0])

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
        q = lambda t: ((t + 1) * 127.5 + 0.5).clamp(0, 255).floor()  # noqa: E731  (uint8, as the evaluator)
        mse = (q(x_hat) - q(x)).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
        out["psnr"] = (10 * torch.log10(255.0**2 / mse)).mean()
        return out

    # Checkpoint contents ----------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for key in [k for k in sd if k.startswith(f"{prefix}loss.perceptual.")]:
            del sd[key]
        return sd

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._flush_nonfinite(int(self.global_step))
        checkpoint["dcae"] = dict(self.meta)
        checkpoint["dcae"]["step"] = int(self.global_step)
        checkpoint["dcae"]["nonfinite_total"] = int(self.nonfinite_total)
        checkpoint["dcae_rng"] = _rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(checkpoint.get("dcae", {}).get("nonfinite_total", 0))
        if "dcae_rng" in checkpoint:
            _set_rng_state(checkpoint["dcae_rng"])


def is_fully_frozen_body(module: nn.Module) -> bool:
    """True when nothing before the module's head trains (encoder: before conv_out; decoder: before norm_out)."""
    head = set(getattr(module, "head_module_names", ()))
    return all(not p.requires_grad for name, p in module.named_parameters() if name.split(".")[0] not in head)


def _adamw(model: nn.Module, params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if not params:
        raise ValueError("no trainable parameters for an optimizer: check the phase's `trainable` globs")
    # No weight decay on norm weights and biases (DC-Gen: keys matching norm.weight and bias).
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = cfg.fused if cfg.fused is not None else all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None)


def _lr_lambda(cfg: OptimizerConfig, max_steps: int):
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optimizer.schedule={cfg.schedule!r}: use 'constant' or 'cosine'")

    def factor(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(max_steps - cfg.warmup_steps, 1)
        t = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def _fused(optimizer) -> bool:
    """A fused torch optimizer (AdamW(fused=True)) takes `found_inf` and skips the update inside its kernel."""
    return bool(getattr(optimizer, "optimizer", optimizer).defaults.get("fused"))


def _clip(optimizer, max_norm: float | None) -> torch.Tensor:
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"), foreach=True)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _rng_state() -> dict[str, Any]:
    import random

    import numpy as np

    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    np_state = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2])}
    state["python_version"] = random.getstate()[0]
    state["python_gauss"] = random.getstate()[2]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    keys = state["numpy"]["keys"].numpy().astype("uint32")
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
