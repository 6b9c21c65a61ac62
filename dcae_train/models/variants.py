"""Every DC-AE variant, named once. Released configs: docs/architecture.md, "Variants" (diffusers `get_ae_config`
for sana-1.0, in/mix, f64, f128; the DC-Gen configs translated to diffusers keys for sana-1.1 and lite).

DC-AE 1.5 (DC-Gen's `dc_ae_f32_1_5`, `dc_ae_f64_1_5`, `dc_ae_f32_1_1`): ResBlocks only, 128 latent channels, no
shortcut around the latent, so any channel prefix can be encoded and decoded (docs/architecture.md, "DC-AE 1.5").
`dc-ae-f32c128-1.1` is the same network trained without prefixes: the unstructured baseline of the 1.5 paper.

Debug variants (random init only, a few hundred thousand parameters, f8):
- `tiny`: sana-style (stride-2 conv down, nearest-interpolate up, RMSNorm + SiLU decoder, multi-scale attention).
- `tiny-in`: in-style (pixel_unshuffle / pixel_shuffle, empty first stages, BatchNorm + ReLU decoder ResBlocks).
Both have ResBlock and EfficientViT stages and all four residual-autoencoding shortcuts.
- `tiny-1.5`: 1.5-style (ResBlocks only, empty first stages, no shortcut around the latent, 16 latent channels).
"""

from __future__ import annotations

from dcae_train.models.config import DCAEConfig

RES, VIT = "ResBlock", "EfficientViTBlock"
_W6 = (128, 256, 512, 512, 1024, 1024)


def _sana(scaling_factor: float = 0.41407) -> DCAEConfig:
    return DCAEConfig(
        latent_channels=32,
        encoder_block_types=(RES,) * 3 + (VIT,) * 3,
        decoder_block_types=(RES,) * 3 + (VIT,) * 3,
        encoder_block_out_channels=_W6,
        decoder_block_out_channels=_W6,
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="relu",
        scaling_factor=scaling_factor,
    )


def _lite() -> DCAEConfig:
    # sana's encoder; a ResBlock-only decoder with no full-resolution stage and a SiLU head (DC-Gen).
    return _sana().replace(
        decoder_block_types=RES,
        decoder_layers_per_block=(0, 3, 5, 4, 4, 4),
        decoder_qkv_multiscales=((),) * 6,
        upsample_block_type="pixel_shuffle",
        decoder_conv_act_fn="silu",
    )


def _in_mix(f: int, scaling_factor: float) -> DCAEConfig:
    """f32c32 / f64c128 / f128c512 in and mix (they differ only in scaling_factor)."""
    extra = {32: 0, 64: 1, 128: 2}[f]  # extra EViT stages at width 2048
    n_vit = 3 + extra
    widths = _W6 + (2048,) * extra
    return DCAEConfig(
        latent_channels={32: 32, 64: 128, 128: 512}[f],
        encoder_block_types=(RES,) * 3 + (VIT,) * n_vit,
        decoder_block_types=(RES,) * 3 + (VIT,) * n_vit,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=(0, 4, 8) + (2,) * n_vit,
        decoder_layers_per_block=(0, 5, 10) + (2,) * n_vit,
        encoder_qkv_multiscales=((),) * len(widths),
        decoder_qkv_multiscales=((),) * len(widths),
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=("batch_norm",) * 3 + ("rms_norm",) * n_vit,
        decoder_act_fns=("relu",) * 3 + ("silu",) * n_vit,
        decoder_conv_act_fn="relu",
        scaling_factor=scaling_factor,
    )


def _tiny() -> DCAEConfig:
    return DCAEConfig(
        latent_channels=8,
        encoder_block_types=(RES, RES, VIT, VIT),
        decoder_block_types=(RES, RES, VIT, VIT),
        encoder_block_out_channels=(16, 32, 64, 64),  # shortcut groups 2, 2, 4; latent groups of 8
        decoder_block_out_channels=(16, 32, 64, 64),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (5,), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="relu",
        scaling_factor=1.0,
    )


def _tiny_in() -> DCAEConfig:
    return DCAEConfig(
        latent_channels=8,
        encoder_block_types=(RES, RES, VIT, VIT),
        decoder_block_types=(RES, RES, VIT, VIT),
        encoder_block_out_channels=(16, 32, 64, 64),
        decoder_block_out_channels=(16, 32, 64, 64),
        encoder_layers_per_block=(0, 2, 1, 1),  # empty first stage: conv_in is a down block 3 -> 32 at H/2
        decoder_layers_per_block=(0, 2, 1, 1),  # empty first stage: the head ends in an up block
        encoder_qkv_multiscales=((),) * 4,
        decoder_qkv_multiscales=((),) * 4,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu", "silu"),
        decoder_conv_act_fn="relu",
        scaling_factor=1.0,
    )


def _v15(extra_stages: int = 0, scaling_factor: float = 1.0) -> DCAEConfig:
    """DC-AE 1.5: f32 (6 stages) or f64 (a 7th stage at 1024, where 1.0's f64 used 2048), 128 latent channels."""
    return _resblocks_no_shortcut(_W6 + (1024,) * extra_stages, (0, 5, 10, 4, 4, 4) + (4,) * extra_stages, 128,
                                  scaling_factor)  # fmt: skip


def _resblocks_no_shortcut(widths: tuple, layers: tuple, latent: int, scaling_factor: float) -> DCAEConfig:
    return DCAEConfig(
        latent_channels=latent,
        encoder_block_types=RES,
        decoder_block_types=RES,
        encoder_block_out_channels=widths,
        decoder_block_out_channels=widths,
        encoder_layers_per_block=layers,
        decoder_layers_per_block=layers,
        encoder_qkv_multiscales=((),) * len(widths),
        decoder_qkv_multiscales=((),) * len(widths),
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        decoder_conv_act_fn="silu",
        encoder_out_shortcut=False,  # no shortcut around the latent: what makes channel prefixes possible
        decoder_in_shortcut=False,
        scaling_factor=scaling_factor,
    )


def _tiny_15() -> DCAEConfig:
    return _resblocks_no_shortcut((16, 32, 64, 64), (0, 1, 1, 1), 16, 1.0)  # 1.5's blocks at tiny's size, f8c16


_REGISTRY = {
    "dc-ae-f32c32-sana-1.0": _sana,
    "dc-ae-f32c32-sana-1.1": _sana,  # the 1.0 architecture; only the decoder weights changed
    "dc-ae-lite-f32c32": _lite,
    "dc-ae-f32c32-in-1.0": lambda: _in_mix(32, 0.3189),
    "dc-ae-f32c32-mix-1.0": lambda: _in_mix(32, 0.4552),
    "dc-ae-f64c128-in-1.0": lambda: _in_mix(64, 0.2889),
    "dc-ae-f64c128-mix-1.0": lambda: _in_mix(64, 0.4538),
    "dc-ae-f128c512-in-1.0": lambda: _in_mix(128, 0.4883),
    "dc-ae-f128c512-mix-1.0": lambda: _in_mix(128, 0.3620),
    # DC-AE 1.5. f32: no scaling factor is published (1.0 here: measure it with latent_stats);
    # f64: 0.5935, the factor DC-Gen's class-to-image model zoo uses with it.
    "dc-ae-f32c128-1.1": _v15,
    "dc-ae-f32c128-1.5": _v15,
    "dc-ae-f64c128-1.5": lambda: _v15(1, 0.5935),
    "tiny": _tiny,
    "tiny-in": _tiny_in,
    "tiny-1.5": _tiny_15,
}
# DC-Gen's zoo names for releases we register under another name (same architecture). The 256 px in-1.0 release
# publishes no scaling factor of its own; it gets in-1.0's (measure it with latent_stats).
ALIASES = {"dc-ae-lite-f32c32-sana-1.1": "dc-ae-lite-f32c32", "dc-ae-f32c32-in-1.0-256px": "dc-ae-f32c32-in-1.0"}

VARIANTS: tuple[str, ...] = tuple(_REGISTRY)
RELEASED_VARIANTS: tuple[str, ...] = tuple(v for v in VARIANTS if v.startswith("dc-ae-"))

# Hugging Face repos of the released weights (original format; diffusers format is `<repo>-diffusers`).
HF_REPOS = {
    **{v: f"mit-han-lab/{v}" for v in RELEASED_VARIANTS},
    "dc-ae-lite-f32c32": "dc-ai/dc-ae-lite-f32c32",
    "dc-ae-f32c128-1.1": None,  # DC-Gen names local paper checkpoints for it, not a Hub repo
    "dc-ae-f32c128-1.5": "dc-ai/dc-ae-f32c128-1.5",
    "dc-ae-f64c128-1.5": "dc-ai/dc-ae-f64c128-1.5",
}


def variant_name(name: str) -> str:
    """The registered name of `name` (also accepted without the `dc-ae-` prefix)."""
    name = ALIASES.get(name, name)
    if name in _REGISTRY:
        return name
    if f"dc-ae-{name}" in _REGISTRY:
        return f"dc-ae-{name}"
    raise ValueError(f"unknown DC-AE variant {name!r}; use one of: {', '.join(VARIANTS)}")


def variant_config(name: str) -> DCAEConfig:
    return _REGISTRY[variant_name(name)]()
