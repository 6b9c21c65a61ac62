"""The run-level schema: the one place where the composed YAML becomes typed.

`conf/train.yaml` starts from the structured config `train_schema` registered here, so Hydra checks
every key and type while composing: a misspelt key on the command line or in a recipe fails before any
work, with a message naming it. Sub-configs owned by other parts of the package (`model`, `data`, each
phase's `loss`) are plain dicts here and become their own dataclasses in `build_run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class OptimizerConfig:
    """AdamW with linear warm-up then a constant (or cosine) learning rate."""

    lr: float = 6.4e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    # Linear warm-up from lr * warmup_start_factor to lr over warmup_steps (DC-Gen: lr/10 over 50k steps).
    warmup_steps: int = 0
    warmup_start_factor: float = 0.1
    schedule: str = "constant"  # constant | cosine (cosine decays to lr * min_lr_factor at max_steps)
    min_lr_factor: float = 0.0
    # Clip the global gradient norm of this optimizer's parameters; null = no clipping.
    grad_clip: float | None = None
    fused: bool | None = None  # None = fused AdamW on CUDA, plain on CPU


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999
    # Effective decay = decay * (1 - exp(-step / warmup_steps)) (DC-Gen's warm-up); 0 = no warm-up.
    warmup_steps: int = 2000
    every: int = 1  # update every N steps


@dataclass
class PhaseConfig:
    """One phase of a recipe (`phases.p1` .. `phases.p3`)."""

    resolution: int = 256
    batch_size: int = 8  # per device
    max_steps: int = 1000  # batches (one autoencoder update each; the discriminator update does not count)
    # Parameter-name globs (fnmatch) of what trains; everything else is frozen (no grad, BN in eval).
    trainable: list[str] = field(default_factory=lambda: ["*"])
    # Loss weights and GAN settings: the keys of dcae_train.losses.LossConfig.
    loss: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    disc_optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=5.4e-5, betas=[0.5, 0.9], weight_decay=0.0)
    )
    ema: EMAConfig = field(default_factory=EMAConfig)
    val_every: int = 500  # steps between validations (and eval metrics)
    val_batches: int = 8  # validation batches per validation
    val_resolution: int | None = None  # default: the phase resolution
    ckpt_every: int = 1000
    keep_checkpoints: int = 3  # newest periodic checkpoints kept (last.ckpt is always kept)
    log_every: int = 10
    image_every: int = 500  # reconstruction grids (PNG in the run folder + wandb)


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto = ddp when more than one device
    precision: str = "auto"  # auto = bf16-mixed on CUDA, 32 on CPU
    deterministic: bool = False
    matmul_precision: str = "high"
    progress_bar: bool = True
    max_nonfinite_steps: int = 20  # consecutive non-finite steps before the run stops with an error


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "dcae-train"
    entity: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PerceptualConfig:
    """Where the LPIPS trunk comes from (its backbone is each phase's loss.lpips_net)."""

    # Real recipes need the pretrained trunk and stop before training without it; the quickstart may
    # fall back to a random trunk (loudly, and recorded in the run config and metrics).
    require_pretrained: bool = True
    allow_download: bool = True


@dataclass
class EvaluationConfig:
    """Protocol metrics (PSNR, SSIM, LPIPS-Alex, rFID) on a fixed validation subset during training."""

    every: int = 0  # steps between evaluations; 0 = off
    num_images: int = 256
    batch_size: int = 16
    lpips: str = "alex"  # alex (protocol; needs the AlexNet trunk offline) | vgg | random | off
    fid: str = "auto"  # auto (Inception if its weights are present) | inception | off


@dataclass
class TrainConfig:
    recipe: str = "quickstart"  # the recipe's name: runs go to <runs_dir>/<recipe>/phase<N>/<time>
    phase: int = 1
    seed: int = 0
    init_from: str | None = None  # weights only: ckpt | diffusers dir | original safetensors | HF id | auto
    init_ema: bool = True  # take the EMA weights of a parent checkpoint when it has them
    resume: str | None = None  # auto | path to a checkpoint of this recipe and phase
    runs_dir: str = "runs"
    run_dir: str | None = None  # explicit run folder (default: <runs_dir>/<recipe>/phase<N>/<time>)
    validate_at_start: bool = True
    model: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    phases: dict[str, PhaseConfig] = field(default_factory=dict)


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_schema()
