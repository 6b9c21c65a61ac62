"""Typed configs of the trainer's parts: optimizer, EMA, phase, the three phases, Lightning trainer, logger.
Torch-free.

The defaults are the DC-AE recipe for the released variants (each value's source in its comment; the tags:
[P] paper arXiv 2410.10733, [M] first author in mit-han-lab/efficientvit#143, [C] the official DC-Gen trainer
harness, [3P] the lavinal712/AutoencoderKL re-implementation, [ours] our choice). Recipes override what
differs; docs/recipe.md explains each value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from dcae_train.losses.config import DiscConfig, LossConfig
from dcae_train.schema import ConfigError, check_at_least, check_choice, require

SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "32", "32-true", "bf16-mixed", "bf16-true", "64-true")
MATMUL_PRECISIONS = ("highest", "high", "medium")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
DEVICE_STRING = re.compile(r"-?\d+|\d+(,\d+)*,?")  # "2", "-1", "0,1", "1," (Lightning's device-id strings)
WANDB_MODES = ("auto", "online", "offline", "disabled")

PHASE2_TRAINABLE = ["encoder.conv_out.*", "decoder.conv_in.*"]  # [3P] encoder.project_out + decoder.project_in
PHASE3_TRAINABLE = ["decoder.norm_out.*", "decoder.conv_out.*"]  # [P] "head layers"; [3P] decoder.project_out


@dataclass
class OptimizerConfig:
    """AdamW; linear warm-up from lr * warmup_start_factor to lr, then constant or cosine."""

    lr: float = 6.4e-5  # peak learning rate; [P] phase 1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas; [P] phase 1
    weight_decay: float = 0.1  # [P] phase 1; never on norm weights and biases ([C] DC-Gen)
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 50000  # linear warm-up steps; [C] DC-Gen: lr/10 -> lr over 50k steps; 0 = none
    warmup_start_factor: float = 0.1  # the warm-up starts at lr * this ([C])
    schedule: str = "constant"  # after the warm-up: constant ([C]) | cosine (to lr * min_lr_factor at max_steps)
    min_lr_factor: float = 0.0  # cosine only: the final learning rate as a fraction of lr
    grad_clip: float | None = None  # clip the global gradient norm of this optimizer's parameters; null = off ([C])
    fused: bool | None = None  # fused AdamW kernel; null = on for CUDA parameters, off on CPU

    def __post_init__(self) -> None:
        require(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "must be a finite number > 0", 1e-4)
        ok = len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)
        require(ok, "betas", list(self.betas), "must be two numbers in [0, 1)", [0.9, 0.999])
        require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0", 0.0)
        require(self.eps > 0, "eps", self.eps, "must be > 0", 1e-8)
        check_at_least(self, ("warmup_steps",), 0)
        for name in ("warmup_start_factor", "min_lr_factor"):
            require(0 <= getattr(self, name) <= 1, name, getattr(self, name), "must be in [0, 1]", 0.1)
        check_choice("schedule", self.schedule, SCHEDULES)
        clip = self.grad_clip
        require(clip is None or clip > 0, "grad_clip", clip, "must be > 0 or null (no clipping)", 1.0)


@dataclass
class EMAConfig:
    enabled: bool = True  # keep an exponential moving average of the trained weights (validated and exported)
    decay: float = 0.9999  # [ours]; DC-Gen's EMA has no default decay
    warmup_steps: int = 2000  # effective decay = decay * (1 - exp(-step / warmup_steps)) ([C]); 0 = none
    every: int = 1  # update every N steps

    def __post_init__(self) -> None:
        require(0.0 <= self.decay < 1.0, "decay", self.decay, "must be in [0, 1)", 0.9999)
        check_at_least(self, ("warmup_steps",), 0)
        check_at_least(self, ("every",), 1)


@dataclass
class LatentPrefixConfig:
    """Structured-latent training (DC-AE 1.5): every step trains on channel prefixes drawn from `channels`, so
    the first channels learn to carry the image on their own. The options are DC-Gen's trainer options."""

    # Candidate prefixes, ascending, the last = the model's latent channels (e.g. [16, 32, ..., 128]); [] = off
    channels: list[int] = field(default_factory=list)
    samples: int = 1  # prefixes drawn per step, uniformly with replacement ([C] num_sample_latent_channels)
    always_full: bool = False  # the full latent is one of them ([C] always_sample_max_channel)
    always_min_max: bool = False  # the smallest prefix and the full latent are two of them ([C] ..._min_max_channel)

    def __post_init__(self) -> None:
        c = list(self.channels)
        ok = all(a < b for a, b in zip(c, c[1:], strict=False)) and all(v >= 1 for v in c)
        require(ok, "channels", c, "must be ascending positive channel counts ending at the latent channels", [16, 32])
        check_at_least(self, ("samples",), 1)
        for flag, least in (("always_full", 2), ("always_min_max", 3)):
            # DC-Gen ignores the flags with one sample and draws nothing beside the fixed ones at the minimum:
            # both would silently train fewer prefixes than asked, so they are errors here [ours].
            if getattr(self, flag):
                require(self.samples >= least, flag, True, f"needs {{p}}samples >= {least}", False)


@dataclass
class PhaseConfig:
    """One phase of a recipe (`phases.p1` .. `phases.p3`). The class defaults are phase 1 of the DC-AE recipe."""

    resolution: int = 256  # training crop size; [P][3P] 256 for phase 1
    batch_size: int = 32  # per device; [ours] 8 GPUs -> 256 global (not published: efficientvit#146)
    max_steps: int = 200000  # batches (one autoencoder update each); [ours] ~40 ImageNet epochs at 256 global
    trainable: list[str] = field(default_factory=lambda: ["*"])  # parameter-name globs (fnmatch) that train
    loss: LossConfig = field(default_factory=LossConfig)  # loss weights and GAN settings
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # the autoencoder's optimizer
    disc_optimizer: OptimizerConfig = field(  # the discriminator's optimizer; [ours] as the generator's in phase 3
        default_factory=lambda: OptimizerConfig(lr=5.4e-5, betas=[0.5, 0.9], weight_decay=0.0, warmup_steps=0)
    )
    ema: EMAConfig = field(default_factory=EMAConfig)  # exponential moving average of the weights
    latent_prefixes: LatentPrefixConfig = field(default_factory=LatentPrefixConfig)  # DC-AE 1.5 structured latent
    val_every: int = 5000  # steps between validations (and reconstruction metrics)
    val_batches: int = 16  # validation batches per validation
    val_resolution: int | None = None  # validation crop size; null = the phase resolution
    ckpt_every: int = 2000  # steps between checkpoints; [ours] (DC-Gen saves every 1000)
    keep_checkpoints: int = 3  # newest periodic checkpoints kept (last.ckpt and final.ckpt are always kept)
    log_every: int = 50  # steps between logged training metrics
    image_every: int = 5000  # steps between reconstruction grids (PNG in the run folder + wandb)

    def __post_init__(self) -> None:
        check_at_least(self, ("resolution", "max_steps"), 1)
        require(self.batch_size >= 1, "batch_size", self.batch_size, "must be >= 1", 8)
        intervals = ("val_every", "val_batches", "ckpt_every", "keep_checkpoints", "log_every", "image_every")
        check_at_least(self, intervals, 1)
        val_res = self.val_resolution
        require(val_res is None or val_res >= 1, "val_resolution", val_res, "must be >= 1 or null (= resolution)")
        require(bool(self.trainable), "trainable", [], "needs at least one parameter-name glob", ["decoder.conv_out.*"])


def _phase2() -> PhaseConfig:
    # High-resolution latent adaptation: only the layers around the latent train, L1 + LPIPS ([M][P] no GAN).
    return PhaseConfig(
        resolution=512,  # [3P] 512; the per-model value is not published (1024 for sana, f64, f128: recipes)
        batch_size=8,  # [ours] 4x the pixels of phase 1 -> 1/4 of its batch
        max_steps=50000,  # [ours]
        trainable=list(PHASE2_TRAINABLE),
        optimizer=OptimizerConfig(lr=1.6e-5, weight_decay=0.001, warmup_steps=1000),  # [P]; warm-up [ours]
        val_every=2500,
        image_every=2500,
    )


def _phase3() -> PhaseConfig:
    # Low-resolution local refinement: the decoder head only, with a PatchGAN ([P]).
    return PhaseConfig(
        resolution=256,  # [P][3P]
        batch_size=32,  # [ours]
        max_steps=50000,  # [ours]
        trainable=list(PHASE3_TRAINABLE),
        loss=LossConfig(
            gan=0.5,  # [3P] disc_weight 0.5, times the adaptive weight ([3P] LDM adaptive weight: on)
            disc=DiscConfig(layers=3, width=64),  # [3P] NLayerDiscriminator n_layers=3, 64 channels
            gan_start=5000,  # [ours] D trains from step 0; G sees the adversarial term after D warmed up
        ),
        optimizer=OptimizerConfig(lr=5.4e-5, betas=[0.5, 0.9], weight_decay=0.0, warmup_steps=0),  # [P]; wd [ours]
        val_every=2500,
        image_every=2500,
    )


@dataclass
class Phases:
    p1: PhaseConfig = field(default_factory=PhaseConfig)  # low-resolution full training ([P] Sec. 3.2)
    p2: PhaseConfig = field(default_factory=_phase2)  # high-resolution latent adaptation
    p3: PhaseConfig = field(default_factory=_phase3)  # low-resolution local refinement (decoder head + GAN)


@dataclass
class TrainerConfig:
    """The Lightning Trainer. devices or num_nodes above 1 (or a torchrun/SLURM launch) switch to DDP."""

    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    devices: Any = "auto"  # auto | N (>= 1) | -1 (all) | a string Lightning reads, e.g. "0,1"
    num_nodes: int = 1  # nodes of a multi-node run (see scripts/launch_torchrun.sh, launch_slurm.sh)
    strategy: str = "auto"  # auto (DDP when more than one process) | ddp | ...
    precision: str = "auto"  # auto = bf16-mixed on CUDA (fp32 islands: attention, norms, LPIPS, GAN weight), 32 on CPU
    deterministic: bool = False  # torch deterministic algorithms (slower; bitwise-repeatable runs)
    matmul_precision: str = "high"  # torch.set_float32_matmul_precision: highest | high (TF32) | medium
    progress_bar: bool = True  # Lightning's progress bar
    max_nonfinite_steps: int = 20  # consecutive non-finite steps before the run stops (exit code 3)
    # Seconds a rank waits in a collective (gradient all-reduce, barrier) for the others before it fails with exit
    # code 4; [ours] 600: a checkpoint write of the largest variant on slow storage fits; torch's default is 1800
    collective_timeout_s: int = 600

    def __post_init__(self) -> None:
        check_choice("accelerator", self.accelerator, ACCELERATORS)
        d = self.devices
        ok = d == "auto" or (isinstance(d, int) and (d >= 1 or d == -1))
        ok = ok or (isinstance(d, str) and DEVICE_STRING.fullmatch(d) is not None and d.lstrip("-") != "0")
        require(ok and not isinstance(d, bool), "devices", d, "must be >= 1, -1 (all), 'auto' or ids like '0,1'", 1)
        check_at_least(self, ("num_nodes", "max_nonfinite_steps"), 1)
        check_at_least(self, ("collective_timeout_s",), 10, 600)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                "precision",
                self.precision,
                "use auto, 32 or bf16-mixed (16-mixed is not supported: gradient clipping would act on scaled "
                "gradients, Lightning #18089)",
                "bf16-mixed",
            )
        check_choice("matmul_precision", self.matmul_precision, MATMUL_PRECISIONS)

    @property
    def multi_device(self) -> bool:
        d = self.devices
        return (isinstance(d, int) and (d > 1 or d == -1)) or (isinstance(d, str) and d not in ("auto", "1"))


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str = "dcae-train"  # wandb project
    entity: str | None = None  # wandb team or user; null = your default
    name: str | None = None  # run name; null = <recipe>-p<phase>-<run folder name>
    tags: list[str] = field(default_factory=list)  # extra tags (the recipe and phase are always added)

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, WANDB_MODES)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # metrics.csv and images/ are always written too
