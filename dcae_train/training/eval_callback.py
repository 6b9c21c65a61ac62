"""EvalCallback: protocol metrics on a fixed validation subset during training, for the raw and EMA weights.

Every `evaluation.every` steps, rank 0 reconstructs the same images with `pl_module.model` and, when
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

from dcae_train.evaluation.config import EvaluationConfig
from dcae_train.evaluation.evaluator import ReconstructionEvaluator, compute_all, evaluate_model
from dcae_train.evaluation.extractors import InceptionFeatures, TinyFeatures
from dcae_train.evaluation.metrics import FeatureStats, to_uint8
from dcae_train.losses.perceptual import LPIPS
from dcae_train.pretrained import INCEPTION, weight_file

log = logging.getLogger(__name__)


class EvalCallback(L.Callback):
    """Every `config.every` steps: the metrics of `config` (an `EvaluationConfig`) on its fixed subset, taken once
    from the datamodule's validation loader, or on `images` ((N, 3, H, W) in [-1, 1]: tests, custom sets)."""

    def __init__(self, config: EvaluationConfig, images: torch.Tensor | None = None) -> None:
        self.config = config
        self.images = images
        # Built now, not at the first evaluation, so a missing weight file fails before training starts.
        self.lpips = _build_lpips(config)
        self.features = _build_features(config)
        self.reference: FeatureStats | None = None
        self._last_step = -1
        self.last_metrics: dict[str, float] = {}

    # Fixed subset ---------------------------------------------------------------------------------------
    def _subset(self, trainer: L.Trainer) -> torch.Tensor:
        if self.images is None:
            chunks, n, want = [], 0, self.config.num_images
            for batch in trainer.datamodule.val_dataloader():
                chunks.append(batch["image"][: want - n])
                n += chunks[-1].shape[0]
                if n >= want:
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
            for x in images.split(self.config.batch_size):
                self.reference.update(self.features(to_uint8(x.to(device))))
        evaluators = {
            p: ReconstructionEvaluator(self.lpips, self.features, reference=self.reference, worst_k=0)
            for p in [None, *self.config.latent_channels]
        }
        evaluate_model(model, ({"image": x} for x in images.split(self.config.batch_size)), evaluators, device)
        metrics = {}
        for p, out in compute_all(evaluators, gather=False).items():  # only rank 0 runs this: no collective
            prefix = "" if p is None else f"c{p}/"
            metrics.update({f"{prefix}{k}": v for k, v in out.items() if isinstance(v, float)})
            metrics[f"{prefix}latent_rms"] = out["latent"]["rms"]
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
        for tag, model in (("eval", pl_module.model), ("eval_ema", pl_module.ema)):
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
        every = self.config.every
        if every and trainer.global_step > 0 and trainer.global_step % every == 0:
            self._run(trainer, pl_module)


def _build_lpips(config: EvaluationConfig) -> LPIPS | None:
    if config.lpips == "off":
        return None
    net = "alex" if config.lpips == "random" else config.lpips
    return LPIPS(net, pretrained=config.lpips != "random", path=config.lpips_weights)


def _build_features(config: EvaluationConfig) -> nn.Module | None:
    if config.fid == "off":
        return None
    if config.fid == "tiny":
        return TinyFeatures()
    if config.fid == "auto":
        try:
            weight_file(INCEPTION, config.inception_weights)
        except FileNotFoundError as e:
            log.info("EvalCallback: rFID off (%s)", e)
            return None
    return InceptionFeatures(config.inception_weights)
