"""build_run(cfg): every object of a training run, after every check, before the Trainer touches a device.

Order matters: the config is typed and checked first (`dcae_train.config.to_config`: a typo never costs a model
build or a data scan), then the environment, the run folder, then model -> loss -> data -> logger -> trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from omegaconf import DictConfig, OmegaConf

from dcae_train.config import TrainConfig, to_config
from dcae_train.data.shards import write_atomic
from dcae_train.losses import AutoencoderLoss
from dcae_train.losses.dino_discriminator import DinoDiscriminator
from dcae_train.models import DCAE, build_model, variant_config
from dcae_train.schema import ConfigError
from dcae_train.training import checkpoint as ckpt_lib
from dcae_train.training.callbacks import (
    AppendingCSVLogger,
    DataPosition,
    FinishedMarker,
    LossCurves,
    ReconstructionGrids,
)
from dcae_train.training.config import PhaseConfig
from dcae_train.training.datamodule import ImageDataModule
from dcae_train.training.eval_callback import EvalCallback
from dcae_train.training.faults import FAULTS_ENV, FaultInjection, Preemption
from dcae_train.training.lock import is_global_rank_zero, lock_run_dir
from dcae_train.training.module import AutoencoderModule
from dcae_train.training.ranks import RankReport
from dcae_train.training.tracking import build_wandb_logger, save_wandb_id, wandb_run_id
from dcae_train.weights import WeightsError, load_model
from dcae_train.weights.checkpoint import CheckpointMeta
from dcae_train.weights.discriminator import WEIGHTS_FILE as DISCRIMINATOR_WEIGHTS
from dcae_train.weights.discriminator import check_architecture, load_discriminator_state, read_discriminator
from dcae_train.weights.loading import non_finite_tensors

ENV_RESOLVED = "DCAE_TRAIN_RESOLVED"  # set by rank 0 for processes Lightning relaunches (DDP children)


@dataclass
class Run:
    cfg: TrainConfig
    phase: PhaseConfig
    run_dir: Path
    trainer: L.Trainer
    module: AutoencoderModule
    datamodule: ImageDataModule
    ckpt_path: str | None
    preemption: Preemption  # .preempted: the run stopped on a signal and continues with resume=auto


def build_run(cfg_in: DictConfig | TrainConfig) -> Run:
    cfg = cfg_in if isinstance(cfg_in, TrainConfig) else to_config(cfg_in)
    phase = cfg.phase_config
    check_environment(cfg)
    paths = resolve_paths(cfg)
    run_dir = Path(paths["run_dir"])
    if is_global_rank_zero():
        source = ("run_dir", cfg.run_dir) if cfg.run_dir else ("runs_dir", cfg.runs_dir)
        lock_run_dir(run_dir, source)  # one writer per run folder: a second one stops here with exit 2
        ckpt_lib.remove_orphaned_temporaries(run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)

    model = build_run_model(cfg, paths["init_from"] if not paths["resume"] else None)
    repa = phase.loss.repa
    loss = AutoencoderLoss(
        phase.loss, cfg.perceptual, foundation=cfg.foundation, latent_channels=model.latent_channels,
        repa_channels=model.feature_channels(repa.where, repa.stage) if repa.enabled else None,
    )  # fmt: skip
    disc_source = cfg.init_discriminator or _shared_discriminator(paths)
    meta = CheckpointMeta(
        model.config.to_dict(), cfg.model.variant, float(model.scaling_factor), cfg.phase, cfg.recipe,
        parent=paths["init_from"], lpips_pretrained=loss.perceptual.pretrained if loss.perceptual else True,
        trainable=list(phase.trainable),
        foundation=_foundation_record(loss), discriminator=_init_discriminator(loss, phase, disc_source),
    )  # fmt: skip
    module = AutoencoderModule(
        model, loss, phase, meta=meta, max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        channels_last=cfg.model.channels_last, seed=cfg.seed,
    )  # fmt: skip
    if cfg.model.compile:
        model.compile()  # in place: state_dict keys stay the diffusers keys
    datamodule = ImageDataModule(
        cfg.data,
        resolution=phase.resolution,
        batch_size=phase.batch_size,
        seed=cfg.seed,
        val_resolution=phase.val_resolution or phase.resolution,
    )
    preemption = Preemption(run_dir)
    wandb_id = wandb_run_id(run_dir)
    trainer = build_trainer(cfg, run_dir, module, preemption, _loggers(cfg, run_dir, wandb_id))
    if trainer.is_global_zero:  # every file of the run folder is written by global rank 0 only
        save_run_config(cfg, run_dir, meta, wandb_id if len(trainer.loggers) > 1 else None)
    return Run(cfg, phase, run_dir, trainer, module, datamodule, paths["resume"], preemption)


def _shared_discriminator(paths: dict[str, Any]) -> str | None:
    """init_from= an export folder written with --with-discriminator: its discriminator too (a phase-3 run that
    continues someone's warmed-up D gives just that folder); init_discriminator= names another source instead."""
    init_from = paths["init_from"]
    if paths["resume"] or not init_from or not (Path(init_from) / DISCRIMINATOR_WEIGHTS).is_file():
        return None
    print(f"init_from={init_from}: loading its {DISCRIMINATOR_WEIGHTS} too (init_discriminator= to use another)")
    return str(init_from)


def _init_discriminator(loss: AutoencoderLoss, phase: PhaseConfig, source: str | None) -> dict[str, Any] | None:
    """The discriminator's architecture record; with `source` (init_discriminator=), its weights loaded from there
    after checking the architecture matches (and LeCAM's EMAs when both sides have them)."""
    if loss.discriminator is None:
        return None
    record: dict[str, Any] = {**dataclasses.asdict(phase.loss.disc), "init_from": source}
    if isinstance(loss.discriminator, DinoDiscriminator):
        trunk = loss.discriminator.trunk
        record["trunk_weights"] = {"pretrained": trunk.pretrained, "sha256": trunk.digest, "file": trunk.weights_file}
    if source:
        state, info = read_discriminator(source)
        check_architecture(info, record, source)
        load_discriminator_state(loss.discriminator, state, source)
        if loss.lecam is not None and info.get("lecam"):
            loss.lecam.ema_real.fill_(info["lecam"]["ema_real"])
            loss.lecam.ema_fake.fill_(info["lecam"]["ema_fake"])
    return record


def _foundation_record(loss: AutoencoderLoss) -> dict[str, Any] | None:
    """What the run's alignment losses compared with: recorded in run.json and every checkpoint."""
    f = loss.foundation
    if f is None:
        return None
    return {"model": f.name, "pretrained": f.pretrained, "sha256": f.digest, "file": f.weights_file}


def check_environment(cfg: TrainConfig) -> None:
    """What the machine must offer for the config (the config's own rules are checked in its dataclasses)."""
    t = cfg.trainer
    if t.strategy != "auto" and t.strategy not in StrategyRegistry:  # Lightning's names need Lightning: checked here
        shown = ", ".join(["auto", *sorted(StrategyRegistry.available_strategies())[:8], "..."])
        raise ConfigError("trainer.strategy", t.strategy, f"not a Lightning strategy name ({shown})", "ddp")
    if t.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError("trainer.accelerator=gpu but CUDA is not available here; use trainer.accelerator=cpu")
    on_cpu = t.accelerator == "cpu" or (t.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and not (t.devices == "auto" or str(t.devices).isdigit()):  # Lightning's CPU takes a process count
        raise ConfigError("trainer.devices", t.devices, "on the CPU must be a number of processes >= 1 or 'auto'", 2)
    gpus = torch.cuda.device_count()
    if isinstance(t.devices, int) and t.devices > 1 and t.accelerator in ("gpu", "cuda") and t.devices > gpus:
        raise ValueError(f"trainer.devices={t.devices} but only {gpus} CUDA devices are visible")


# Run folder, resume and parent checkpoint -------------------------------------------------------------
def resolve_paths(cfg: TrainConfig) -> dict[str, Any]:
    """Decide run_dir, the checkpoint to resume and the weights to start from. DDP children reuse rank 0's."""
    if os.environ.get(ENV_RESOLVED) and int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return json.loads(os.environ[ENV_RESOLVED])
    resume: str | None = None
    init_from = cfg.init_from
    path: Path | None = None
    if cfg.resume == "auto":  # the launch's own or the newest run folder: its best checkpoint, or step 0 if none
        run_dir, path = ckpt_lib.resume_target(cfg.runs_dir, cfg.recipe, cfg.phase, _own_run_dir(cfg))
    elif cfg.resume:
        path = Path(cfg.resume)
        run_dir = Path(cfg.run_dir) if cfg.run_dir else path.parent.parent
    else:
        run_dir = _new_run_dir(cfg)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint file")
        if not ckpt_lib.is_loadable(path):
            raise ValueError(f"resume={path}: the file is truncated or corrupt; pass an earlier checkpoint")
        step = ckpt_lib.check_resumable(path)
        ckpt_lib.check_same_run(path, cfg.recipe, cfg.phase, cfg.model.variant, list(cfg.phase_config.trainable))
        if is_global_rank_zero():
            print(f"resuming {path} at step {step}", flush=True)
        resume = str(path)
    elif cfg.phase > 1 and (init_from is None or init_from == "auto"):
        init_from = str(ckpt_lib.find_parent_checkpoint(cfg.runs_dir, cfg.recipe, cfg.phase))
    resolved = {"run_dir": str(run_dir.resolve()), "resume": resume, "init_from": init_from}
    os.environ[ENV_RESOLVED] = json.dumps(resolved)
    return resolved


def _new_run_dir(cfg: TrainConfig) -> Path:
    own = _own_run_dir(cfg)
    if own is not None:
        return own
    if _launched_externally():
        raise ValueError(
            "multi-process launch without a shared run folder: pass run_dir=<path> (the same on every rank), "
            "or launch under SLURM or torchrun with --rdzv-id"
        )
    return ckpt_lib.phase_root(cfg.runs_dir, cfg.recipe, cfg.phase) / datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def _own_run_dir(cfg: TrainConfig) -> Path | None:
    """The folder this launch names: run_dir=, or `job-<id>` under torchrun / SLURM (every rank runs this, so the
    name must not depend on the clock; a requeued SLURM job keeps its id and so its folder). None: a new timestamp."""
    if cfg.run_dir:
        return Path(cfg.run_dir)
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    if not _launched_externally() or not job or job == "none":
        return None
    return ckpt_lib.phase_root(cfg.runs_dir, cfg.recipe, cfg.phase) / f"job-{job}"


# Objects ------------------------------------------------------------------------------------------------
def build_run_model(cfg: TrainConfig, init_from: str | None) -> DCAE:
    """The variant with random weights, or the weights of `init_from` (which must hold the same architecture)."""
    variant = cfg.model.variant
    if init_from:
        model = load_model(init_from, ema=cfg.init_ema)
        bad = non_finite_tensors(model)
        if bad:  # training from them only skips non-finite steps until the run stops
            raise WeightsError(
                f"init_from={init_from}: {len(bad)} tensor(s) hold NaN or Inf, e.g. {', '.join(bad[:5])}. These "
                f"weights diverged: start from an earlier checkpoint of that run (its step*.ckpt files)"
            )
        want = variant_config(variant).to_diffusers_config()
        got = model.config.to_diffusers_config()
        diff = sorted(k for k in want if k != "scaling_factor" and want[k] != got[k])
        if diff:
            raise ValueError(
                f"init_from={init_from} holds a different architecture than model.variant={variant} "
                f"({diff[0]}: {got[diff[0]]} vs {want[diff[0]]}); pick the recipe/variant that matches the weights"
            )
    else:
        model = build_model(variant)
    if cfg.model.gradient_checkpointing:
        model.set_gradient_checkpointing(True)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_trainer(
    cfg: TrainConfig, run_dir: Path, module: AutoencoderModule, preemption: Preemption, loggers: list[Any]
) -> L.Trainer:
    t, phase = cfg.trainer, cfg.phase_config
    on_gpu = t.accelerator in ("gpu", "cuda") or (t.accelerator == "auto" and torch.cuda.is_available())
    precision = t.precision if t.precision != "auto" else ("bf16-mixed" if on_gpu else "32-true")
    multi = _multi_process(cfg)
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(cfg, module) if multi else t.strategy,
        precision=precision,
        max_steps=phase.max_steps,
        max_epochs=-1,
        val_check_interval=phase.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=phase.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=phase.log_every,
        logger=loggers,
        callbacks=_callbacks(cfg, run_dir, preemption),
        plugins=[ckpt_lib.AtomicCheckpointIO(), *_cluster_plugins()],
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        sync_batchnorm=multi and _trains_batchnorm(module),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
    )


def _strategy(cfg: TrainConfig, module: AutoencoderModule) -> Any:
    if cfg.trainer.strategy not in ("ddp", "auto"):
        return cfg.trainer.strategy
    # G and D share one DDP wrapper: D is unused in the generator's pass before gan_start and G in D's pass.
    # The timeout bounds how long a rank waits for a lost one (torch's default: 30 min) before it fails.
    return DDPStrategy(
        find_unused_parameters=module.loss.discriminator is not None,
        timeout=timedelta(seconds=cfg.trainer.collective_timeout_s),
    )


def _cluster_plugins() -> list[Any]:
    # Under SLURM our Preemption callback owns SIGUSR1 as well as SIGTERM (checkpoint, exit 75, and
    # scripts/launch_slurm.sh requeues): Lightning's own auto-requeue would write a second kind of checkpoint.
    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


def _trains_batchnorm(module: AutoencoderModule) -> bool:
    return any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None and m.weight.requires_grad
        for m in module.model.modules()
    )


def _loggers(cfg: TrainConfig, run_dir: Path, wandb_id: str) -> list[Any]:
    loggers: list[Any] = [AppendingCSVLogger(save_dir=str(run_dir), name="", version="")]
    wandb_logger = build_wandb_logger(cfg.logger.wandb, run_dir, cfg.recipe, cfg.phase, wandb_id)
    return loggers + ([wandb_logger] if wandb_logger is not None else [])


def _callbacks(cfg: TrainConfig, run_dir: Path, preemption: Preemption) -> list[L.Callback]:
    phase = cfg.phase_config
    callbacks: list[L.Callback] = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="step{step:08d}",
            auto_insert_metric_name=False,
            every_n_train_steps=phase.ckpt_every,
            save_top_k=phase.keep_checkpoints,
            monitor="step",
            mode="max",
            save_last=True,
            enable_version_counter=False,  # always last.ckpt: a preemption or an earlier run wrote one already
        ),
        ReconstructionGrids(run_dir, phase.image_every),
        LossCurves(run_dir),
        DataPosition(),
        RankReport(run_dir),  # before FinishedMarker: replicas that disagree never mark the run finished
        FinishedMarker(run_dir, {"recipe": cfg.recipe, "phase": cfg.phase}, preemption),
        preemption,
    ]
    if cfg.evaluation.every > 0:
        callbacks.append(EvalCallback(cfg.evaluation))
    if os.environ.get(FAULTS_ENV):
        callbacks.append(FaultInjection(os.environ[FAULTS_ENV]))
    return callbacks


def _launched_externally() -> bool:
    """torchrun (WORLD_SIZE) or srun (SLURM_NTASKS) started every rank: no relaunch by Lightning."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _multi_process(cfg: TrainConfig) -> bool:
    return cfg.trainer.multi_device or cfg.trainer.num_nodes > 1 or _launched_externally()


def save_run_config(cfg: TrainConfig, run_dir: Path, meta: CheckpointMeta, wandb_id: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if wandb_id:
        save_wandb_id(run_dir, wandb_id)
    resolved = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    name = "config.yaml" if not (run_dir / "config.yaml").exists() else "config.resumed.yaml"
    write_atomic(run_dir / name, resolved.encode())
    info = {**meta.to_dict(), "config": None, "model": meta.config}
    write_atomic(run_dir / "run.json", json.dumps(info, indent=2).encode())
