"""`python -m dcae_train.cost recipe=NAME [key=value ...]`: what each phase of a recipe costs.

    python -m dcae_train.cost recipe=dc-ae-f32c32-sana-1.1                 # the three phases, H100 SXM at MFU 0.35
    python -m dcae_train.cost recipe=dc-ae-f64c128-in-1.0 --chip A100 --mfu 0.4 trainer.devices=8 trainer.num_nodes=4
    python -m dcae_train.cost --all --markdown                             # the table of docs/cost.md

The overrides are the trainer's (`dcae_train.config.compose`, the same config tree). Nothing is computed on
real numbers: the recipe's own training step (`train_step`: the autoencoder's frozen-prefix forward, its loss with
LPIPS, the frozen foundation model with the VF/REPA terms, the discriminator and its aids (DiffAugment, LeCAM,
lazy R1, amortised) as the phase configures them, the backward, the discriminator's step) runs once on
fake tensors (`FakeTensorMode`: shapes and dtypes only, so a full-size model at 1024 px costs a fraction of a
second) at the phase's resolution, and

- FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts what runs (convolutions, matmuls, attention; not
  elementwise ops, norms or the optimizer), split into forward and backward by whether autograd's engine is
  running; checkpointed blocks recomputed in the backward count in the backward. Torch's formula for the
  backward of a *grouped* convolution overcounts the weight gradient by the group count (it ignores `groups`), so
  `convolution_backward` is counted here as one forward convolution per gradient it computes (exact for any
  `groups`); the CPU kernel of fused attention (the DINOv2 ViTs on fake CPU tensors), which torch's registry
  lacks, is counted with torch's attention formula.
- memory: every tensor the step allocates is followed until it is freed (`_LiveBytes`), at the configured
  per-device batch and precision (bf16-mixed as CPU autocast, whose bf16 op list covers the convolutions and
  matmuls of these networks), with gradient checkpointing as configured; the states that live across steps
  (weights, AdamW moments, EMA copy, DDP gradient buckets) are added from their sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf
from torch import nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from dcae_train.config import TrainConfig, compose, recipe_names, to_config
from dcae_train.losses import AutoencoderLoss
from dcae_train.models import DCAE, build_model, variant_config
from dcae_train.training.module import generator_loss
from dcae_train.training.phases import freeze_all_but, select_trainable
from dcae_train.weights import WeightsError
from dcae_train.weights.loading import check_local_source

# Dense BF16 tensor-core peaks from the vendors' datasheets (the sparsity figures are twice these).
CHIPS = {
    "H100-SXM": 989e12,  # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s BF16 dense
    "H100-PCIe": 756e12,  # NVIDIA H100 PCIe datasheet: 756 TFLOP/s BF16 dense
    "H200": 989e12,  # NVIDIA H200 SXM datasheet: the H100's tensor cores, 989 TFLOP/s BF16 dense
    "A100": 312e12,  # NVIDIA A100 datasheet: 312 TFLOP/s BF16 dense
    "B200": 2250e12,  # NVIDIA HGX B200 datasheet: 2.25 PFLOP/s BF16 dense per GPU
}
DEFAULT_CHIP = "H100-SXM"
# [ours] an assumption, not a measurement (no GPU run of ours exists yet): large convolutional autoencoders in
# bf16 with a VGG16 loss net typically reach a third of the tensor-core peak; replace it with a measured value.
DEFAULT_MFU = 0.35
DEFAULT_GPUS_PER_NODE = 8  # [ours] trainer.devices=-1 ("all GPUs of the node") is costed as an 8-GPU node
GIB = 2**30


# The training step, as the trainer runs it ----------------------------------------------------------------
def train_step(
    model: DCAE,
    loss: AutoencoderLoss,
    x: torch.Tensor,
    *,
    step: int,
    prefixes: list[int] | None = None,
    optimizers: Sequence[torch.optim.Optimizer] = (),
) -> None:
    """One batch of `AutoencoderModule.training_step` without Lightning: the generator pass (frozen-prefix
    forward, the trainer's own `generator_loss` over the prefixes with the foundation features, VF and REPA terms
    and their adaptive weights, backward), then the discriminator pass once it trains. With `optimizers`
    (generator's, then discriminator's) each pass ends in a real AdamW step; gradients are freed after each pass
    as the trainer's `zero_grad(set_to_none=True)` does. Not run: the collapse guard's check of D's accuracy after
    its step (a host read of one number, no FLOPs; a reset it may trigger is rare)."""
    disc = loss.discriminator
    # Lightning's toggled_optimizer: D gets no gradients from the generator's backward
    with _frozen(disc), _repa_outputs(model, loss) as hidden:
        zs, x_hats = model.reconstruct(x, prefixes)
        g_loss, _ = generator_loss(model, loss, x, zs, x_hats, step=step, hidden=hidden)
        hidden.clear()
        g_loss.backward()
        _finish(optimizers[0] if optimizers else None, model, loss)
    del zs, g_loss
    if disc is not None and loss.disc_active(step):
        fakes = x_hats[0] if len(x_hats) == 1 else torch.cat(x_hats)
        d_loss, _ = loss.discriminator_loss(x, fakes.detach(), step=step)
        del x_hats, fakes
        d_loss.backward()
        _finish(optimizers[1] if len(optimizers) > 1 else None, disc)


@contextlib.contextmanager
def _repa_outputs(model: DCAE, loss: AutoencoderLoss) -> Iterator[list[torch.Tensor]]:
    """The REPA stage's outputs of the step, captured as the trainer's forward hook does (training passes only)."""
    hidden: list[torch.Tensor] = []
    if loss.repa is None:
        yield hidden
        return
    r = loss.repa.config
    handle = model.feature_module(r.where, r.stage).register_forward_hook(
        lambda _m, _i, out: hidden.append(out) if torch.is_grad_enabled() else None
    )
    try:
        yield hidden
    finally:
        handle.remove()


@contextlib.contextmanager
def _frozen(module: nn.Module | None) -> Iterator[None]:
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _finish(optimizer: torch.optim.Optimizer | None, *modules: nn.Module) -> None:
    if optimizer is not None:
        optimizer.step()
    for module in modules:
        module.zero_grad(set_to_none=True)


# Building a phase's parts -----------------------------------------------------------------------------------
def build_parts(cfg: TrainConfig, width: float | None = None) -> tuple[DCAE, AutoencoderLoss]:
    """The phase's model (frozen as the phase says, checkpointing and parameter dtype as configured) and loss, on
    the current device and tensor mode. `width`: every block width times this (a reduced-width twin)."""
    phase, name = cfg.phase_config, cfg.model.variant
    arch = variant_config(name)
    model = build_model(name if width is None else arch.scaled(width))
    model.set_gradient_checkpointing(cfg.model.gradient_checkpointing)
    freeze_all_but(model, select_trainable(model, phase.trainable, key=f"phases.p{cfg.phase}.trainable"))
    repa = phase.loss.repa
    loss = AutoencoderLoss(
        phase.loss, lpips_pretrained=False, shapes_only=_in_fake_mode(), foundation=cfg.foundation,
        latent_channels=model.latent_channels, foundation_pretrained=False,
        repa_channels=model.feature_channels(repa.where, repa.stage) if repa.enabled else None,
    )  # fmt: skip  # the trainer's loss (training/run.py), random weights: only shapes matter here
    if loss.discriminator is not None and _in_fake_mode():
        # The collapse guard's pause (the step before which G does not see a reset D) is read on the host, which a
        # fake tensor cannot give: a constant 0 (no collapse), the costlier branch in which G sees D from gan_start.
        loss.gan_pause_until = torch.tensor(0)
    if precision(cfg) == "bf16-true":
        model.to(torch.bfloat16)
        loss.to(torch.bfloat16)  # LPIPS stays fp32 (FrozenModule), the discriminator follows
    return model, loss


def _in_fake_mode() -> bool:
    return detect_fake_mode() is not None


def precision(cfg: TrainConfig) -> str:
    """The precision a GPU run uses: `auto` is bf16-mixed on CUDA (training/run.py)."""
    p = cfg.trainer.precision
    return {"auto": "bf16-mixed", "32": "32-true"}.get(p, p)


def autocast(cfg: TrainConfig) -> contextlib.AbstractContextManager:
    if precision(cfg) != "bf16-mixed":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)  # fake CPU tensors: CPU autocast stands in for CUDA's


def step_prefixes(cfg: TrainConfig) -> list[int] | None:
    """Latent prefixes per step, each costed as the full latent (an upper bound: only the first conv of the
    decoder and the last of the encoder shrink with a prefix)."""
    lp = cfg.phase_config.latent_prefixes
    return [lp.channels[-1]] * lp.samples if lp.channels else None


# FLOPs --------------------------------------------------------------------------------------------------------
def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape, **kwargs) -> int:  # fmt: skip
    """Each gradient of a convolution (input, weight) costs one forward convolution: the same products, regrouped.
    Torch's formula transposes batch and channels for the weight gradient and loses `groups` on the way."""
    return conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * (int(output_mask[0]) + int(output_mask[1]))


def _cpu_attention_flop(q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def _cpu_attention_backward_flop(grad_out_shape, q_shape, k_shape, v_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, q_shape, k_shape, v_shape)


# For FlopCounterMode(custom_mapping=...): torch's formulas with the convolution backward corrected, and the CPU
# kernel of fused attention (what the ViTs of the foundation model and the DINO discriminator run here; on a GPU
# they run the flash or memory-efficient kernel, which torch counts with these same formulas) that it lacks.
CORRECTED_FORMULAS = {
    torch.ops.aten.convolution_backward: _conv_backward_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flop,
}


@dataclass
class Flops:
    forward: float = 0.0
    backward: float = 0.0  # includes checkpointed blocks recomputed during the backward

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def scale(self, k: float) -> Flops:
        return Flops(self.forward * k, self.backward * k)


@contextlib.contextmanager
def count_flops() -> Iterator[tuple[Flops, FlopCounterMode]]:
    """FlopCounterMode with the corrected convolution backward, split by whether autograd's engine runs the op."""
    flops = Flops()

    def tally(formula):
        def counted(*args, **kwargs):
            n = formula(*args, **kwargs)
            if torch._C._current_graph_task_id() == -1:  # -1: not inside autograd's engine
                flops.forward += n
            else:
                flops.backward += n
            return n

        counted._get_raw = True  # type: ignore[attr-defined]  # already takes out_val: FlopCounterMode must not rewrap
        return counted

    ops = {**flop_registry, **{op: shape_wrapper(f) for op, f in CORRECTED_FORMULAS.items()}}
    mode = FlopCounterMode(display=False, custom_mapping={op: tally(f) for op, f in ops.items()})
    with mode:
        yield flops, mode


def count_step(cfg: TrainConfig, *, step: int, width: float | None = None) -> tuple[Flops, float]:
    """FLOPs per image of one training step at `step` (batch 1, fake tensors): (the step, of which the
    autoencoder's modules, forward + backward)."""
    res = cfg.phase_config.resolution
    with FakeTensorMode():
        model, loss = build_parts(cfg, width)
        with count_flops() as (flops, mode):
            train_step(model, loss, torch.randn(1, 3, res, res), step=step, prefixes=step_prefixes(cfg))
    # The loss nets are always entered through __call__ (their module names are reliable); the autoencoder's
    # frozen-prefix forward calls parts of it directly, so it is the rest.
    per_module = {k: sum(v.values()) for k, v in mode.get_flop_counts().items()}
    loss_nets = sum(per_module.get(name, 0) for name in LOSS_NETS)
    return flops, flops.total - loss_nets


# The loss's networks, by the class name FlopCounterMode files each under (each is entered through __call__; the
# DINO discriminator's trunk is counted inside DinoDiscriminator, the foundation model's ViT inside FoundationModel).
# The VF and REPA losses are not among them: their projectors are a fraction of a GFLOP, and the module tracker
# files part of the encoder's backward under VFLoss (autograd reaches the encoder through z while VFLoss's
# backward is still open), so the autoencoder's share keeps them. The same tracker files part of R1's double
# backward outside the discriminator (about 2 GFLOP per image of sana-1.1's phase 3 with phases.p3.loss.r1=1.0, in
# the autoencoder's share); the step's total is exact either way.
LOSS_NETS = ("LPIPS", "NLayerDiscriminator", "DinoDiscriminator", "FoundationModel")


def amortised_step(cfg: TrainConfig, *, step: int, width: float | None = None) -> tuple[Flops, float]:
    """`count_step` at `step`, with lazy R1 amortised: the trainer adds the penalty on the steps that are multiples
    of r1_every, so a step with it counts 1/r1_every and one without it the rest."""
    loss = cfg.phase_config.loss
    if not (loss.gan > 0 and loss.r1 > 0 and step >= loss.disc_start) or loss.r1_every == 1:
        return count_step(cfg, step=step, width=width)
    k = 1 / loss.r1_every
    (f1, ae1), (f0, ae0) = (count_step(with_r1(cfg, on), step=step, width=width) for on in (True, False))
    return f1.scale(k) + f0.scale(1 - k), ae1 * k + ae0 * (1 - k)


def with_r1(cfg: TrainConfig, on: bool) -> TrainConfig:
    """A copy of `cfg` whose every step has the R1 penalty (`on`, r1_every=1) or none (r1=0): the cost of a step
    with it does not depend on gamma or on the interval."""
    out = copy.deepcopy(cfg)
    loss = out.phase_config.loss
    if on:
        loss.r1_every = 1
    else:
        loss.r1 = 0.0
    return out


def step_peak_bytes(cfg: TrainConfig, *, step: int, batch: int, width: float | None = None) -> int:
    """Peak bytes allocated during one training step at `step` at this per-device batch (fake tensors, the
    configured precision). A pass of its own: FlopCounterMode's module hooks keep tensors alive longer."""
    res = cfg.phase_config.resolution
    with FakeTensorMode():
        model, loss = build_parts(cfg, width)
        with _LiveBytes(existing=[model, loss]) as live, autocast(cfg):
            x = torch.randn(batch, 3, res, res)
            train_step(model, loss, x, step=step, prefixes=step_prefixes(cfg))
            del x
    return live.peak


def regimes(cfg: TrainConfig) -> list[tuple[int, int]]:
    """(first step, number of steps) of each stretch where the step does the same work: phase 3's changes at
    disc_start (the discriminator trains) and gan_start (the generator sees it)."""
    phase, loss = cfg.phase_config, cfg.phase_config.loss
    starts = sorted({0, *((loss.disc_start, loss.gan_start) if loss.gan > 0 else ())})
    starts = [s for s in starts if s < phase.max_steps]
    return [(s, e - s) for s, e in zip(starts, [*starts[1:], phase.max_steps], strict=True)]


# Memory -------------------------------------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Bytes of every storage allocated under this mode and not yet freed, and their peak.

    Hand-written (torch's MemTracker is private API of torch.distributed): one weak reference per storage, whose
    callback subtracts its bytes when autograd or Python drops the last tensor on it. Views share their base's
    storage and are counted once; so are views of the `existing` modules' weights (counted as states)."""

    def __init__(self, existing: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref | None] = {}
        self._existing = [t.untyped_storage() for m in existing for t in (*m.parameters(), *m.buffers())]
        self._refs.update({id(st): None for st in self._existing})  # kept alive by _existing: no id is reused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs:
            return
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, n=n: self._free(key, n))

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._refs.pop(key, None)


@dataclass
class Memory:
    """Peak bytes per GPU: states that live across steps (from their sizes) + the step's peak (simulated)."""

    weights: int = 0  # autoencoder + LPIPS trunk + foundation model + discriminator + VF/REPA projectors (+ buffers)
    adamw: int = 0  # two moments per trainable parameter (autoencoder, discriminator, projectors)
    ema: int = 0  # the EMA copy of the whole autoencoder
    ddp_buckets: int = 0  # DDP's gradient buckets: one more copy of the trainable gradients (multi-GPU)
    step_peak: int = 0  # the step's peak: batch, activations, recomputation, gradients, temporaries

    @property
    def total(self) -> int:
        return self.weights + self.adamw + self.ema + self.ddp_buckets + self.step_peak


def _nbytes(module: nn.Module | None, trainable_only: bool = False) -> int:
    if module is None:
        return 0
    tensors = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    if not trainable_only:
        tensors += list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def static_memory(cfg: TrainConfig, world_size: int, width: float | None = None) -> Memory:
    """The states that live across steps, from the sizes of the phase's parts."""
    with FakeTensorMode():
        model, loss = build_parts(cfg, width)
        disc, projectors = loss.discriminator, (loss.vf, loss.repa)  # D with its frozen DINO trunk, if any
        trainable = sum(_nbytes(m, trainable_only=True) for m in (model, disc, *projectors))
        frozen_nets = _nbytes(loss.perceptual) + _nbytes(loss.foundation)
        return Memory(
            weights=_nbytes(model) + frozen_nets + sum(_nbytes(m) for m in (disc, *projectors)),
            adamw=2 * trainable,
            ema=_nbytes(model) if cfg.phase_config.ema.enabled else 0,
            ddp_buckets=trainable if world_size > 1 else 0,
        )


# One phase, one recipe ------------------------------------------------------------------------------------------
@dataclass
class PhaseCost:
    recipe: str
    phase: int
    variant: str
    resolution: int
    batch_size: int  # per device
    devices: int
    nodes: int
    steps: int
    trainable: int  # of the autoencoder
    frozen: int
    discriminator: int  # its trainable parameters (a DINO discriminator's trunk is frozen), 0 without a GAN loss
    flops: Flops  # per image, mean over the phase's steps
    autoencoder: float  # per image, forward + backward of the autoencoder's modules, mean over the phase's steps
    memory: Memory
    precision: str
    checkpointing: bool
    assumed_devices: bool = False  # trainer.devices was -1 / auto: --gpus-per-node was used

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.devices * self.nodes  # one update per batch: no gradient accumulation

    @property
    def images(self) -> int:
        return self.steps * self.global_batch

    @property
    def total_flop(self) -> float:
        return self.images * self.flops.total

    def gpu_hours(self, peak: float, mfu: float) -> float:
        return self.total_flop / (peak * mfu) / 3600


def device_count(cfg: TrainConfig, gpus_per_node: int) -> tuple[int, bool]:
    """(devices per node, whether that is our assumption rather than the config's)."""
    d = cfg.trainer.devices
    if isinstance(d, int) and d >= 1:
        return d, False
    if isinstance(d, str) and d.isdigit():
        return int(d), False
    if isinstance(d, str) and "," in d:
        return len([s for s in d.split(",") if s.strip()]), False
    return gpus_per_node, True


def phase_cost(cfg: TrainConfig, gpus_per_node: int = DEFAULT_GPUS_PER_NODE, width: float | None = None) -> PhaseCost:
    """Every figure of one phase. FLOPs per image are the mean over the phase's regimes (lazy R1 amortised); memory
    is the last regime's (the steady state, on a step with R1 where there is one), at the configured per-device
    batch."""
    phase = cfg.phase_config
    devices, assumed = device_count(cfg, gpus_per_node)
    with FakeTensorMode():
        model, loss = build_parts(cfg, width)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        d = loss.discriminator
        disc = sum(p.numel() for p in d.parameters() if p.requires_grad) if d is not None else 0
    mean, autoencoder, stretches = Flops(), 0.0, regimes(cfg)
    for start, steps in stretches:
        flops, ae = amortised_step(cfg, step=start, width=width)
        mean, autoencoder = mean + flops.scale(steps / phase.max_steps), autoencoder + ae * steps / phase.max_steps
    memory = static_memory(cfg, devices * cfg.trainer.num_nodes, width)
    # the steady state's peak: a step with R1 where the phase has it (its double backward is the largest graph)
    last = with_r1(cfg, True) if phase.loss.gan > 0 and phase.loss.r1 > 0 else cfg
    memory.step_peak = step_peak_bytes(last, step=stretches[-1][0], batch=phase.batch_size, width=width)
    return PhaseCost(
        recipe=cfg.recipe, phase=cfg.phase, variant=cfg.model.variant, resolution=phase.resolution,
        batch_size=phase.batch_size, devices=devices, nodes=cfg.trainer.num_nodes, steps=phase.max_steps,
        trainable=trainable, frozen=frozen, discriminator=disc, flops=mean, autoencoder=autoencoder,
        memory=memory, precision=precision(cfg), checkpointing=cfg.model.gradient_checkpointing,
        assumed_devices=assumed,
    )  # fmt: skip


def phase_configs(overrides: Sequence[str] = ()) -> list[TrainConfig]:
    """The recipe's three phases (or the one `phase=N` names), composed exactly as `python -m dcae_train
    <overrides> phase=N` would. data.train, which the cost does not read, is filled when the recipe leaves it to
    the command line."""
    composed = compose(overrides)
    chosen = any(o.partition("=")[0] == "phase" for o in overrides)
    out = []
    for n in (composed.phase,) if chosen else (1, 2, 3):
        cfg = composed.copy()
        cfg.phase = n
        if OmegaConf.is_missing(cfg.data, "train"):
            cfg.data.train = "demo"  # not read: the cost needs no images
        out.append(to_config(cfg))
    return out


# Output -----------------------------------------------------------------------------------------------------
COLUMNS = (
    "recipe", "phase", "res", "global batch", "steps", "images", "trainable", "frozen", "fwd GFLOP/img",
    "bwd GFLOP/img", "AE fwd+bwd", "PFLOP", "GPU-h", "peak GiB/GPU",
)  # fmt: skip


def row(c: PhaseCost, peak: float, mfu: float) -> list[str]:
    gb = f"{c.batch_size}x{c.devices}" + (f"x{c.nodes}" if c.nodes > 1 else "") + f"={c.global_batch}"
    return [
        c.recipe, str(c.phase), str(c.resolution), gb + ("*" if c.assumed_devices else ""), f"{c.steps:,}",
        _si(c.images), _millions(c.trainable), _millions(c.frozen), _num(c.flops.forward / 1e9),
        _num(c.flops.backward / 1e9), _num(c.autoencoder / 1e9), _num(c.total_flop / 1e15),
        _num(c.gpu_hours(peak, mfu)), f"{c.memory.total / GIB:.1f}",
    ]  # fmt: skip


def _si(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return str(int(n))


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k" if n else "0"


def _num(x: float) -> str:
    """Whole numbers from 100 on, else two significant digits (the quickstart's figures are tiny)."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def markdown_table(costs: Sequence[PhaseCost], peak: float, mfu: float) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(c, peak, mfu)) + " |" for c in costs]
    return "\n".join(lines) + "\n"


def text_report(costs: Sequence[PhaseCost], chip: str, peak: float, mfu: float, gpus_per_node: int) -> str:
    out = []
    for c in costs:
        m = c.memory
        ck = "on" if c.checkpointing else "off"
        out += [
            f"{c.recipe} phase {c.phase}: {c.variant} at {c.resolution} px, {c.precision}, checkpointing {ck}",
            f"  parameters    trainable {c.trainable:,}  frozen {c.frozen:,}"
            + (f"  (+ discriminator {c.discriminator:,})" if c.discriminator else ""),
            f"  images        {c.steps:,} steps x global batch {c.global_batch} ({c.batch_size} per device x "
            f"{c.devices} devices{'*' if c.assumed_devices else ''} x {c.nodes} nodes) = {c.images:,}",
            f"  GFLOP/image   forward {c.flops.forward / 1e9:,.1f}  backward {c.flops.backward / 1e9:,.1f}  "
            f"(of these, the autoencoder: {c.autoencoder / 1e9:,.1f})",
            f"  total         {_num(c.total_flop / 1e15)} PFLOP = {_num(c.gpu_hours(peak, mfu))} GPU-hours on {chip} "
            f"at MFU {mfu}",
            f"  peak memory   {m.total / GIB:.2f} GiB per GPU = weights {m.weights / GIB:.2f} + AdamW "
            f"{m.adamw / GIB:.2f} + EMA {m.ema / GIB:.2f} + DDP buckets {m.ddp_buckets / GIB:.2f} + step "
            f"{m.step_peak / GIB:.2f} (batch, activations, gradients)",
        ]
    out.append(ASSUMPTIONS.format(peak=peak / 1e12, mfu=mfu, gpn=gpus_per_node))
    return "\n".join(out) + "\n"


ASSUMPTIONS = """\
Counted: convolutions, matmuls and attention (2 FLOP per multiply-add) of the autoencoder, of LPIPS (on x and x_hat,
backward into x_hat), of the frozen foundation model (VF/REPA: forward without a graph), the VF/REPA projectors and
the VF adaptive weight's extra gradients, and of the discriminator (generator and discriminator passes; a DINO
discriminator's frozen trunk with its backward into x_hat; lazy R1 amortised over r1_every); checkpointed blocks
recomputed in the backward count there. Not counted: elementwise ops (DiffAugment, LeCAM), norms, the optimizer,
EMA, validation, the collapse guard (a host read; its resets).
GPU-hours = FLOP / ({peak:.0f} TFLOP/s x MFU {mfu}); the default MFU 0.35 is an assumption [ours], not a measurement.
Memory per GPU: allocated tensor bytes (what torch.cuda.max_memory_allocated reports), estimated on fake tensors;
the CUDA context, cuDNN workspaces and the caching allocator's slack come on top.
* trainer.devices is -1 or auto: {gpn} GPUs per node assumed (--gpus-per-node)."""


# Command line ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m dcae_train.cost",
        description="FLOPs, GPU-hours and peak memory of each phase of a recipe (overrides: as python -m dcae_train)",
        epilog="e.g. recipe=dc-ae-f32c32-sana-1.1 phase=2 trainer.devices=8 trainer.num_nodes=4 --chip A100 --mfu 0.4; "
        "how it is counted: docs/cost.md",
    )
    p.add_argument("--chip", default=DEFAULT_CHIP, help=f"one of {', '.join(CHIPS)} (dense BF16 peak)")
    p.add_argument("--peak-tflops", type=float, default=None, help="a chip's peak in TFLOP/s instead of --chip")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="model FLOP utilisation, in (0, 1] [ours: 0.35]")
    p.add_argument("--gpus-per-node", type=int, default=DEFAULT_GPUS_PER_NODE, help="when trainer.devices=-1")
    p.add_argument("--all", action="store_true", help="every recipe in recipes/")
    p.add_argument("--markdown", action="store_true", help="one Markdown table (docs/cost.md)")
    return p.parse_known_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        peak = _peak(args)
        if args.all and any(o.partition("=")[0] == "recipe" for o in overrides):
            raise ValueError("--all costs every recipe: drop recipe=..., or drop --all to cost one")
        if not 0 < args.mfu <= 1 or args.gpus_per_node < 1:
            raise ValueError(f"--mfu={args.mfu} must be in (0, 1] and --gpus-per-node >= 1, e.g. --mfu 0.35")
        recipes = recipe_names() if args.all else [None]
        configs = [cfg for r in recipes for cfg in phase_configs([*overrides, *([f"recipe={r}"] if r else [])])]
        check_sources(configs)
        costs = [phase_cost(cfg, args.gpus_per_node) for cfg in configs]
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown_table(costs, peak, args.mfu), end="")
    else:
        chip = args.chip if args.peak_tflops is None else f"a {args.peak_tflops:g} TFLOP/s chip"
        print(text_report(costs, chip, peak, args.mfu, args.gpus_per_node), end="")
    return 0


def check_sources(configs: Sequence[TrainConfig]) -> None:
    """The cost reads no weights, but a local init_from= / init_discriminator= that does not exist would stop the
    training run it prices: said here too."""
    for cfg in configs:
        for key in ("init_from", "init_discriminator"):
            source = getattr(cfg, key)
            if source and source != "auto":
                try:
                    check_local_source(source)
                except WeightsError as err:
                    raise ValueError(f"{key}={source}: {err}") from None


def _peak(args: argparse.Namespace) -> float:
    if args.peak_tflops is not None:
        if not (args.peak_tflops > 0 and math.isfinite(args.peak_tflops)):
            raise ValueError(f"--peak-tflops={args.peak_tflops} must be a number > 0, e.g. 989")
        return args.peak_tflops * 1e12
    if args.chip not in CHIPS:
        raise ValueError(f"--chip={args.chip} is not known; use one of {', '.join(CHIPS)} or --peak-tflops N")
    return CHIPS[args.chip]


if __name__ == "__main__":
    raise SystemExit(main())
