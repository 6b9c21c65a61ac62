"""EvalCallback: protocol metrics on a fixed validation subset during training, for the raw and EMA weights.

Every `every_n_steps` optimizer steps, rank 0 reconstructs the same images with `pl_module.model` and, when
present, `pl_module.ema`, and logs `eval/{psnr,ssim,lpips,rfid,latent_rms}` and `eval_ema/...` to every
logger of the trainer (CSV and wandb) at that step; `last_metrics` holds the latest values. rFID is computed
only when the Inception weights are present (offline); on a subset of a few hundred images it is biased
upwards and meant for trends, not for tables.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from torch import nn

from dcae_train.evaluation.evaluator import ReconstructionEvaluator
from dcae_train.evaluation.extractors import INCEPTION, InceptionFeatures, LPIPSMetric, TinyFeatures, find_weights
from dcae_train.evaluation.metrics import FeatureStats, to_uint8

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    """Args:
    every_n_steps: evaluate when `trainer.global_step` is a multiple of this.
    num_images: size of the fixed subset, taken once from the datamodule's validation loader.
    images: an explicit (N, 3, H, W) subset in [-1, 1] instead (tests, custom sets).
    lpips: "alex" (protocol; offline weights required), "vgg", "random" (tests) or "off".
    fid: "auto" (Inception if its weights are found, else skipped with a log line), "inception", "tiny"
        (random features, tests) or "off".
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_images: int = 256,
        batch_size: int = 16,
        images: torch.Tensor | None = None,
        lpips: str = "alex",
        lpips_weights: str | None = None,
        fid: str = "auto",
        inception_weights: str | None = None,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"EvalCallback every_n_steps={every_n_steps} must be >= 1")
        if lpips not in ("alex", "vgg", "random", "off"):
            raise ValueError(f"EvalCallback lpips={lpips!r}: use 'alex', 'vgg', 'random' or 'off'")
        if fid not in ("auto", "inception", "tiny", "off"):
            raise ValueError(f"EvalCallback fid={fid!r}: use 'auto', 'inception', 'tiny' or 'off'")
        self.every, self.num_images, self.batch_size = every_n_steps, num_images, batch_size
        self.images = images
        # Built now, not at the first evaluation, so a missing weight file fails before training starts.
        self.lpips = self._build_lpips(lpips, lpips_weights)
        self.features = self._build_features(fid, inception_weights)
        self.reference: FeatureStats | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    @staticmethod
    def _build_lpips(kind: str, path: str | None) -> nn.Module | None:
        if kind == "off":
            return None
        return LPIPSMetric("alex" if kind == "random" else kind, trunk_path=path, random_trunk=kind == "random")

    @staticmethod
    def _build_features(kind: str, path: str | None) -> nn.Module | None:
        if kind == "off":
            return None
        if kind == "tiny":
            return TinyFeatures()
        if kind == "auto":
            try:
                find_weights(INCEPTION, path)
            except FileNotFoundError as e:
                log.info("EvalCallback: rFID off (%s)", e)
                return None
        return InceptionFeatures(path)

    # Fixed subset ---------------------------------------------------------------------------------------
    def _subset(self, trainer: L.Trainer) -> torch.Tensor:
        if self.images is None:
            chunks, n = [], 0
            for batch in trainer.datamodule.val_dataloader():
                chunks.append(batch["image"][: self.num_images - n])
                n += chunks[-1].shape[0]
                if n >= self.num_images:
                    break
            if not chunks:
                raise ValueError("EvalCallback: the validation loader yielded no images")
            self.images = torch.cat(chunks)
        return self.images

    # Evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: nn.Module, images: torch.Tensor, device: torch.device) -> dict[str, float]:
        for m in (self.lpips, self.features):
            if m is not None:
                m.to(device)
        if self.features is not None and self.reference is None:
            self.reference = FeatureStats(self.features.num_features)
            for x in images.split(self.batch_size):
                self.reference.update(self.features(to_uint8(x.to(device))))
        ev = ReconstructionEvaluator(self.lpips, self.features, reference=self.reference, worst_k=0)
        was_training = model.training
        model.eval()
        for x in images.split(self.batch_size):
            x = x.to(device)
            z = model.encode(x)
            ev.update(x, model.decode(z).float(), z.float())
        model.train(was_training)
        out = ev.compute(gather=False)  # only rank 0 runs this: a collective would hang
        metrics = {k: v for k, v in out.items() if isinstance(v, float)}
        metrics["latent_rms"] = out["latent"]["rms"]
        return metrics

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        if not trainer.is_global_zero:
            return
        images = self._subset(trainer)
        logs = {}
        for tag, model in (("eval", pl_module.model), ("eval_ema", getattr(pl_module, "ema", None))):
            if model is not None:
                metrics = self.evaluate(model, images, pl_module.device)
                logs.update({f"{tag}/{k}": v for k, v in metrics.items()})
        pl_module.train(pl_module.training)  # re-apply the module's frozen-norm policy after model.train()
        self.last_metrics = logs
        # Straight to the loggers (CSV, wandb): `pl_module.log` from a callback would be dropped unless the
        # step happens to fall on the trainer's `log_every_n_steps`.
        for logger in trainer.loggers:
            logger.log_metrics(logs, step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every == 0:
            self._run(trainer, pl_module)
