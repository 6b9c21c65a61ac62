"""build_run(cfg): every check and every object of a training run, before the Trainer touches a device.

Order matters: cheap validation of the config first (so a typo never costs a model build or a data scan),
then the run folder, then model -> loss -> data -> logger -> trainer.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from dcae_train.training import checkpoint as ckpt_lib
from dcae_train.training.config import PhaseConfig, TrainConfig
from dcae_train.training.module import AutoencoderModule

log = logging.getLogger(__name__)

ENV_RESOLVED = "DCAE_TRAIN_RESOLVED"  # set by rank 0 for processes Lightning relaunches (DDP children)
MODEL_KEYS = {"variant", "gradient_checkpointing", "channels_last", "compile"}


@dataclass
class Run:
    cfg: TrainConfig
    phase: PhaseConfig
    run_dir: Path
    trainer: L.Trainer
    module: AutoencoderModule
    datamodule: L.LightningDataModule
    ckpt_path: str | None


# Validation (no expensive work) ---------------------------------------------------------------------------
def to_config(cfg: DictConfig | dict) -> TrainConfig:
    """Composed DictConfig -> TrainConfig (types already checked by the structured schema)."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " data.train='/data/shards/train-{000000..000099}.tar'" if "data.train" in missing else ""
        raise ValueError(f"{missing[0]} is required (???) and not set: give it on the command line, e.g.{example}")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    return obj


def phase_config(cfg: TrainConfig) -> PhaseConfig:
    if cfg.phase not in (1, 2, 3):
        raise ValueError(f"phase={cfg.phase}: the recipe has phases 1, 2 and 3 (e.g. `python -m dcae_train phase=2`)")
    key = f"p{cfg.phase}"
    if key not in cfg.phases:
        raise ValueError(
            f"recipe {cfg.recipe!r} defines no phases.{key} (it has: {sorted(cfg.phases) or 'none'}); "
            f"add phases.{key} to the recipe or pick another phase"
        )
    return cfg.phases[key]


def validate(cfg: TrainConfig, phase: PhaseConfig) -> None:
    """Config checks that need no model weights, data or device (each names the key and a valid example)."""
    from dcae_train.data import DataConfig
    from dcae_train.losses import LossConfig
    from dcae_train.models import VARIANTS, DCAEConfig

    p = f"phases.p{cfg.phase}"
    unknown = set(cfg.model) - MODEL_KEYS
    if unknown:
        raise ValueError(f"model.{sorted(unknown)[0]}: unknown key; model takes {sorted(MODEL_KEYS)}")
    variant = cfg.model.get("variant")
    if variant not in VARIANTS:
        raise ValueError(f"model.variant={variant!r} is not a known variant; use one of: {', '.join(VARIANTS)}")
    ratio = 2 ** (len(DCAEConfig.from_variant(variant).encoder_block_out_channels) - 1)
    for key, res in ((f"{p}.resolution", phase.resolution), (f"{p}.val_resolution", phase.val_resolution)):
        if res is not None and (res <= 0 or res % ratio):
            lo, hi = max(ratio, res // ratio * ratio), (res // ratio + 1) * ratio
            raise ValueError(f"{key}={res} must be a positive multiple of {ratio} for {variant}; e.g. {lo} or {hi}")
    if phase.batch_size < 1:
        raise ValueError(f"{p}.batch_size={phase.batch_size} must be >= 1, e.g. {p}.batch_size=8")
    if phase.max_steps < 1:
        raise ValueError(f"{p}.max_steps={phase.max_steps} must be >= 1")
    for key in ("val_every", "ckpt_every", "log_every", "image_every", "val_batches", "keep_checkpoints"):
        if getattr(phase, key) < 1:
            raise ValueError(f"{p}.{key}={getattr(phase, key)} must be >= 1")
    loss_cfg = LossConfig(**phase.loss)  # unknown loss keys raise here, naming the key
    if cfg.phase == 3 and getattr(loss_cfg, "gan", 0.0) <= 0:
        raise ValueError(
            f"{p}.loss.gan={getattr(loss_cfg, 'gan', 0.0)}: phase 3 (local refinement) trains with a GAN loss; "
            f"set {p}.loss.gan (e.g. 0.5) and {p}.loss.disc (e.g. {{layers: 3, width: 64}})"
        )
    _validate_shards(DataConfig.from_dict(cfg.data))
    _validate_devices(cfg)
    if cfg.resume and cfg.init_from:
        raise ValueError("resume= continues a run (full state); init_from= starts a new one from weights: give one")


def _validate_shards(data) -> None:
    """Local shard specs must match files now, not after the model is built and the workers started."""
    from dcae_train.data.config import is_demo
    from dcae_train.data.webdataset import sources_from_spec

    for key in ("train", "val"):
        spec = getattr(data, key)
        if spec is not None and not is_demo(spec):
            sources_from_spec(spec, f"data.{key}")


def _validate_devices(cfg: TrainConfig) -> None:
    devices = cfg.trainer.devices
    accel = cfg.trainer.accelerator
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise ValueError(f"trainer.devices={devices} must be >= 1, -1 (all) or 'auto'")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator=gpu but CUDA is not available here; use trainer.accelerator=cpu")
    if isinstance(devices, int) and devices > 1 and accel in ("gpu", "cuda") and devices > torch.cuda.device_count():
        raise ValueError(f"trainer.devices={devices} but only {torch.cuda.device_count()} CUDA devices are visible")
    if cfg.trainer.precision not in ("auto", "32", "32-true", "bf16-mixed", "bf16-true", "64-true"):
        raise ValueError(
            f"trainer.precision={cfg.trainer.precision!r}: use auto, 32 or bf16-mixed (16-mixed is not supported: "
            "gradient clipping would act on scaled gradients, Lightning #18089)"
        )


# Run folder, resume and parent checkpoint -------------------------------------------------------------
def resolve_paths(cfg: TrainConfig) -> dict[str, Any]:
    """Decide run_dir, the checkpoint to resume and the weights to start from. DDP children reuse rank 0's."""
    if os.environ.get(ENV_RESOLVED) and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return json.loads(os.environ[ENV_RESOLVED])
    resume: str | None = None
    init_from = cfg.init_from
    if cfg.resume:
        path = (
            ckpt_lib.find_resume_checkpoint(cfg.runs_dir, cfg.recipe, cfg.phase)
            if cfg.resume == "auto"
            else Path(cfg.resume)
        )
        if not path.is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint file")
        if not ckpt_lib.is_loadable(path):
            raise ValueError(f"resume={path}: the file is truncated or corrupt; pass an earlier checkpoint")
        ckpt_lib.check_resumable(path)
        resume = str(path)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else path.parent.parent
    else:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else _new_run_dir(cfg)
        if cfg.phase > 1 and (init_from is None or init_from == "auto"):
            init_from = str(ckpt_lib.find_parent_checkpoint(cfg.runs_dir, cfg.recipe, cfg.phase))
    resolved = {"run_dir": str(run_dir.resolve()), "resume": resume, "init_from": init_from}
    os.environ[ENV_RESOLVED] = json.dumps(resolved)
    return resolved


def _new_run_dir(cfg: TrainConfig) -> Path:
    root = ckpt_lib.phase_root(cfg.runs_dir, cfg.recipe, cfg.phase)
    if _launched_externally():
        # Started by torchrun / SLURM: every rank runs this, so the name must not depend on the clock.
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
        if not job or job == "none":
            raise ValueError(
                "multi-process launch without a shared run folder: pass run_dir=<path> (the same on every rank), "
                "or launch under SLURM or torchrun with --rdzv-id"
            )
        return root / f"job-{job}"
    return root / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


# Objects ------------------------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, init_from: str | None):
    from dcae_train.models import DCAEConfig
    from dcae_train.models import build_model as build_variant

    variant = cfg.model["variant"]
    if init_from:
        from dcae_train.weights import load_model

        model = load_model(init_from, ema=cfg.init_ema)
        want = DCAEConfig.from_variant(variant).to_diffusers_config()
        got = model.config.to_diffusers_config()
        diff = {k for k in want if k != "scaling_factor" and want[k] != got.get(k)}
        if diff:
            key = sorted(diff)[0]
            raise ValueError(
                f"init_from={init_from} holds a different architecture than model.variant={variant} "
                f"({key}: {got.get(key)} vs {want[key]}); pick the recipe/variant that matches the weights"
            )
    else:
        model = build_variant(variant)
    if cfg.model.get("gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
    if cfg.model.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_loss(cfg: TrainConfig, phase: PhaseConfig):
    from dcae_train.losses import AutoencoderLoss, LossConfig

    return AutoencoderLoss(
        LossConfig(**phase.loss),
        lpips_pretrained=True,
        require_pretrained=cfg.perceptual.require_pretrained,
        allow_download=cfg.perceptual.allow_download,
    )


def build_datamodule(cfg: TrainConfig, phase: PhaseConfig):
    from dcae_train.data import DataConfig, ImageDataModule

    data_cfg = DataConfig.from_dict(cfg.data)
    return ImageDataModule(
        data_cfg,
        resolution=phase.resolution,
        batch_size=phase.batch_size,
        seed=cfg.seed,
        val_resolution=phase.val_resolution or phase.resolution,
        val_batch_size=phase.batch_size,
    )


def build_run(cfg_in: DictConfig | TrainConfig) -> Run:
    cfg = cfg_in if isinstance(cfg_in, TrainConfig) else to_config(cfg_in)
    phase = phase_config(cfg)
    validate(cfg, phase)
    paths = resolve_paths(cfg)
    run_dir = Path(paths["run_dir"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)

    model = build_model(cfg, paths["init_from"] if not paths["resume"] else None)
    loss = build_loss(cfg, phase)
    meta = {
        "config": model.config.to_dict(),
        "variant": cfg.model["variant"],
        "scaling_factor": float(model.scaling_factor),
        "phase": cfg.phase,
        "recipe": cfg.recipe,
        "parent": paths["init_from"],
        "lpips_pretrained": bool(getattr(loss.perceptual, "pretrained", True)),
    }
    module = AutoencoderModule(
        model,
        loss,
        phase,
        phase_index=cfg.phase,
        meta=meta,
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        channels_last=bool(cfg.model.get("channels_last")),
    )
    if cfg.model.get("compile"):
        model.compile()  # in place: state_dict keys stay the diffusers keys
    datamodule = build_datamodule(cfg, phase)
    trainer = build_trainer(cfg, phase, run_dir, module, meta)
    if trainer.is_global_zero:
        save_run_config(cfg, run_dir, meta)
    return Run(cfg, phase, run_dir, trainer, module, datamodule, paths["resume"])


def build_trainer(cfg: TrainConfig, phase: PhaseConfig, run_dir: Path, module: AutoencoderModule, meta: dict):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import DDPStrategy

    from dcae_train.training.callbacks import FinishedMarker, LossCurves, ReconstructionGrids
    from dcae_train.training.faults import FAULTS_ENV, FaultInjection, Preemption
    from dcae_train.training.tracking import build_wandb_logger

    t = cfg.trainer
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    has_disc = getattr(module.loss, "discriminator", None) is not None
    strategy: Any = t.strategy
    if strategy in ("ddp", "auto") and _multi_process(cfg):
        # G and D share one DDP wrapper: D is unused in the generator's pass before gan_start and G in D's pass.
        strategy = DDPStrategy(find_unused_parameters=has_disc)
    trains_bn = any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
        for m in module.model.modules()
    )
    loggers: list[Any] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_logger = build_wandb_logger(cfg, run_dir)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    ckpt_cb = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=phase.ckpt_every,
        save_top_k=phase.keep_checkpoints,
        monitor="step",
        mode="max",
        save_last=True,
    )
    callbacks = [
        ckpt_cb,
        ReconstructionGrids(run_dir, phase.image_every),
        LossCurves(run_dir),
        FinishedMarker(run_dir, {"recipe": cfg.recipe, "phase": cfg.phase}),
        # Under SLURM, Lightning's auto-requeue owns SIGUSR1 (it saves an hpc checkpoint and requeues the job).
        Preemption(run_dir, handle_usr1="SLURM_JOB_ID" not in os.environ),
    ]
    if cfg.evaluation.every > 0:
        from dcae_train.evaluation import EvalCallback

        e = cfg.evaluation
        callbacks.append(
            EvalCallback(e.every, num_images=e.num_images, batch_size=e.batch_size, lpips=e.lpips, fid=e.fid)
        )
    if os.environ.get(FAULTS_ENV):
        callbacks.append(FaultInjection(os.environ[FAULTS_ENV]))
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=precision,
        max_steps=phase.max_steps,
        max_epochs=-1,
        val_check_interval=phase.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=phase.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=phase.log_every,
        logger=loggers,
        callbacks=callbacks,
        plugins=[ckpt_lib.AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        sync_batchnorm=trains_bn and _multi_process(cfg),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )


def _launched_externally() -> bool:
    """torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) started every rank: no relaunch by Lightning."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _multi_process(cfg: TrainConfig) -> bool:
    d = cfg.trainer.devices
    many_devices = (isinstance(d, int) and (d > 1 or d == -1)) or (isinstance(d, str) and d not in ("auto", "1"))
    return many_devices or cfg.trainer.num_nodes > 1 or _launched_externally()


def save_run_config(cfg: TrainConfig, run_dir: Path, meta: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    name = "config.yaml" if not (run_dir / "config.yaml").exists() else "config.resumed.yaml"
    (run_dir / name).write_text(resolved)
    (run_dir / "run.json").write_text(json.dumps({**meta, "config": None, "model": meta["config"]}, indent=2))
