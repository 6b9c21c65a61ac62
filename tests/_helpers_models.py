"""Helpers for the model-zoo tests: diffusers twins, randomised BatchNorm statistics, relative errors."""

from __future__ import annotations

import torch
from torch import nn

from dcae_train.models import DCAE, DCAEConfig

# Parameter totals (docs/architecture.md): the published ones of the 1.0 releases; for DC-AE 1.5, those of DC-Gen's
# own model code (`dc_ae_f32_1_5`, `dc_ae_f64_1_5`, `dc_ae_f32_1_1`) built on the meta device.
PUBLISHED_PARAMS = {
    "dc-ae-f32c32-sana-1.0": 312_250_275,
    "dc-ae-f32c32-sana-1.1": 312_250_275,
    "dc-ae-lite-f32c32": 421_181_228,
    "dc-ae-f32c32-in-1.0": 323_356_460,
    "dc-ae-f32c32-mix-1.0": 323_356_460,
    "dc-ae-f64c128-in-1.0": 676_896_140,
    "dc-ae-f64c128-mix-1.0": 676_896_140,
    "dc-ae-f128c512-in-1.0": 1_120_682_252,
    "dc-ae-f128c512-mix-1.0": 1_120_682_252,
    "dc-ae-f32c128-1.1": 523_609_740,  # encoder 228,609,408 + decoder 295,000,332
    "dc-ae-f32c128-1.5": 523_609_740,
    "dc-ae-f64c128-1.5": 714_741_644,  # encoder 306,478,720 + decoder 408,262,924
}

# One reduced-width config per variant family (in and mix differ only in scaling_factor): 1/8 of every width and
# of the latent channels, so every shortcut keeps its group size (down/up 2 or 4; latent 32, 16, 4).
FAMILY_WIDTHS = {
    "dc-ae-f32c32-sana-1.1": 0.125,
    "dc-ae-lite-f32c32": 0.125,
    "dc-ae-f32c32-in-1.0": 0.125,
    "dc-ae-f64c128-mix-1.0": 0.125,
    "dc-ae-f128c512-in-1.0": 0.125,
    "dc-ae-f32c128-1.5": 0.125,
    "tiny": 1.0,
    "tiny-in": 1.0,
    "tiny-1.5": 1.0,
}


def diffusers_model(config: DCAEConfig) -> nn.Module:
    from diffusers import AutoencoderDC

    return AutoencoderDC(**config.to_diffusers_config())


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> int:
    """Random running statistics (and affine params) so eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                count += 1
    return count


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """RMSNorm weights/biases away from (1, 0) so a swapped weight/bias would show up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + (0.75 if name.endswith("weight") else -0.25))


def twin_pair(config: DCAEConfig, direction: str = "to_ours") -> tuple[nn.Module, DCAE]:
    """(diffusers model, our model) with identical weights, both in eval mode.

    direction "to_ours": diffusers is initialised and copied into ours; "to_diffusers": the reverse. Both strict.
    """
    torch.manual_seed(0)
    ref, ours = diffusers_model(config), DCAE(config)
    src, dst = (ref, ours) if direction == "to_ours" else (ours, ref)
    randomise_batchnorm(src)
    randomise_norms(src)
    dst.load_state_dict(src.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale max |b|."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
