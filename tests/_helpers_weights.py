"""Shared helpers for the weights / export tests: small models, diffusers twins, output comparison."""

from __future__ import annotations

import torch

from dcae_train.models import DCAE, DCAEConfig, variant_config


def small_config(name: str) -> DCAEConfig:
    """The debug variants as they are; released variants at 1/8 width (same key grammar, CPU-sized). Where 1/8 of
    the last encoder width is no longer a multiple of the latent channels (f128c512: 256 vs 512), the latent is
    scaled too."""
    config = variant_config(name)
    if name in ("tiny", "tiny-in"):
        return config
    return config.scaled(0.125, scale_latent=config.encoder_block_out_channels[-1] // 8 % config.latent_channels != 0)


def random_model(config: DCAEConfig, seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    model = DCAE(config).eval()
    with torch.no_grad():  # BatchNorm running stats away from their init, so a lost buffer shows up
        for name, buf in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buf.uniform_(0.5, 1.5)
    return model


def diffusers_twin(config: DCAEConfig, state_dict: dict[str, torch.Tensor]):
    from diffusers import AutoencoderDC

    model = AutoencoderDC(**config.to_diffusers_config()).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


@torch.no_grad()
def max_output_diff(ours: DCAE, theirs, size: int) -> float:
    torch.manual_seed(1)
    x = torch.rand(1, 3, size, size) * 2 - 1
    return (ours(x) - theirs(x).sample).abs().max().item()
