"""The DC-AE model zoo: architecture only, state_dict-identical to diffusers `AutoencoderDC`.

    from dcae_train.models import DCAE, DCAEConfig, VARIANTS, build_model, variant_config
    model = build_model("dc-ae-f32c32-sana-1.1")       # or "tiny", or build_model(DCAEConfig(...))
    z = model.encode(x)                                # x: (B, 3, H, W) in [-1, 1] -> (B, 32, H/32, W/32)
    x_hat = model.decode(z)
    z_diff = model.encode_scaled(x)                    # = encode(x) * model.scaling_factor (diffusion latents)
    x_hat = model.decode_scaled(z_diff)                # = decode(z_diff / model.scaling_factor)

Files: `config.py` (DCAEConfig), `variants.py` (VARIANTS), `options.py` (ModelConfig: the run's `model:` node),
`blocks.py` (norms, ResBlock, EfficientViT block, down/up blocks and shortcuts), `encoder.py`, `decoder.py`,
`autoencoder.py` (DCAE, build_model), `checkpointing.py` (per-block activation checkpointing, BatchNorm-safe),
`tiling.py` (tiled encode/decode with whole-image attention). Facts: docs/architecture.md.

Stable module names (= diffusers keys; the training phases select parameters by these globs):

| name | what | phase |
|---|---|---|
| `encoder.conv_in.*` | stem: 3x3 conv, or a down block `encoder.conv_in.conv.*` when stage 0 is empty | 1 |
| `encoder.down_blocks.<i>.<j>.*` | stage i: blocks j = 0..Li-1, then the down block `.<Li>.conv.*` | 1 |
| `encoder.conv_out.*` | last conv before the latent (plus the parameter-free channel-average shortcut) | 1, 2 |
| `decoder.conv_in.*` | first conv after the latent (plus the parameter-free channel-repeat shortcut) | 1, 2 |
| `decoder.up_blocks.<i>.0.conv.*` | stage i's up block (i < n-1), then blocks `.<1..Li>.*` | 1 |
| `decoder.norm_out.*` | head RMSNorm (weight, bias) | 1, 3 |
| `decoder.conv_out.*` | head conv (`decoder.conv_out.conv.*` when stage 0 is empty) | 1, 3 |

Phase 2 (latent adaptation) = `encoder.conv_out.*`, `decoder.conv_in.*`; phase 3 (decoder head) =
`decoder.norm_out.*`, `decoder.conv_out.*`. Inside blocks: ResBlock `conv1`, `conv2`, `norm`; EfficientViT block
`attn.{to_q,to_k,to_v,to_qkv_multiscale.<s>.{proj_in,proj_out},to_out,norm_out}`,
`conv_out.{conv_inverted,conv_depth,conv_point,norm}`.
"""

from dcae_train.models.autoencoder import DCAE, build_model
from dcae_train.models.config import DCAEConfig
from dcae_train.models.options import ModelConfig
from dcae_train.models.variants import HF_REPOS, RELEASED_VARIANTS, VARIANTS, variant_config

__all__ = [
    "DCAE",
    "DCAEConfig",
    "HF_REPOS",
    "ModelConfig",
    "RELEASED_VARIANTS",
    "VARIANTS",
    "build_model",
    "variant_config",
]
