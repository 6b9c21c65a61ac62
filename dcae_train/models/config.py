"""`DCAEConfig`: the architecture as a typed dataclass, one field per diffusers `AutoencoderDC` constructor key.

The 19 diffusers keys keep their names and defaults (the diffusers defaults), so a diffusers `config.json`
maps onto this class field for field. Values are normalised once, in `__post_init__`:

- a single string for a per-stage key (`"ResBlock"`, `"rms_norm"`, `"silu"`) is broadcast to every stage;
- lists become tuples; `"swish"` is read as `"silu"`;
- `downsample_block_type` becomes `"pixel_unshuffle"` or `"conv"` (diffusers builds a stride-2 conv for *any*
  other string, e.g. the Hub's `"Conv"`), `upsample_block_type` becomes `"interpolate"` or `"pixel_shuffle"`.

Extras that diffusers does not have: `gradient_checkpointing`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dcae_train.schema import reject_unknown

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACT_FNS = ("silu", "relu", "mish", "gelu")
_ACT_ALIASES = {"swish": "silu"}

# The 19 keys of `AutoencoderDC.__init__`, in its order.
DIFFUSERS_KEYS = (
    "in_channels",
    "latent_channels",
    "attention_head_dim",
    "encoder_block_types",
    "decoder_block_types",
    "encoder_block_out_channels",
    "decoder_block_out_channels",
    "encoder_layers_per_block",
    "decoder_layers_per_block",
    "encoder_qkv_multiscales",
    "decoder_qkv_multiscales",
    "upsample_block_type",
    "downsample_block_type",
    "decoder_norm_types",
    "decoder_act_fns",
    "encoder_out_shortcut",
    "decoder_in_shortcut",
    "decoder_conv_act_fn",
    "scaling_factor",
)
EXTRA_KEYS = ("gradient_checkpointing",)

_SANA_WIDTHS = (128, 256, 512, 512, 1024, 1024)
_SANA_SCALES: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))


@dataclass(frozen=True)
class DCAEConfig:
    """DC-AE architecture. Field names and defaults are those of diffusers `AutoencoderDC`."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] | str = "ResBlock"
    decoder_block_types: tuple[str, ...] | str = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = _SANA_WIDTHS
    decoder_block_out_channels: tuple[int, ...] = _SANA_WIDTHS
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = _SANA_SCALES
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = _SANA_SCALES
    upsample_block_type: str = "pixel_shuffle"  # "interpolate" (nearest x2 + conv) | anything else: conv + shuffle
    downsample_block_type: str = "pixel_unshuffle"  # "pixel_unshuffle" | anything else: stride-2 conv
    decoder_norm_types: tuple[str, ...] | str = "rms_norm"
    decoder_act_fns: tuple[str, ...] | str = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0  # diffusion latents are encode(x) * scaling_factor
    # Extras (not diffusers keys)
    gradient_checkpointing: bool = field(default=False, compare=False)  # a run-time switch, not architecture

    # Construction --------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        n = len(self.encoder_block_out_channels)
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        set_(self, "encoder_block_out_channels", _int_tuple(self.encoder_block_out_channels))
        set_(self, "decoder_block_out_channels", _int_tuple(self.decoder_block_out_channels))
        set_(self, "encoder_layers_per_block", _int_tuple(self.encoder_layers_per_block))
        set_(self, "decoder_layers_per_block", _int_tuple(self.decoder_layers_per_block))
        set_(self, "encoder_qkv_multiscales", tuple(_int_tuple(s) for s in self.encoder_qkv_multiscales))
        set_(self, "decoder_qkv_multiscales", tuple(_int_tuple(s) for s in self.decoder_qkv_multiscales))
        set_(self, "encoder_block_types", _per_stage(self.encoder_block_types, n))
        set_(self, "decoder_block_types", _per_stage(self.decoder_block_types, n))
        set_(self, "decoder_norm_types", _per_stage(self.decoder_norm_types, n))
        acts = tuple(_ACT_ALIASES.get(a, a) for a in _per_stage(self.decoder_act_fns, n))
        set_(self, "decoder_act_fns", acts)
        set_(self, "decoder_conv_act_fn", _ACT_ALIASES.get(self.decoder_conv_act_fn, self.decoder_conv_act_fn))
        down = "pixel_unshuffle" if self.downsample_block_type == "pixel_unshuffle" else "conv"
        up = "interpolate" if self.upsample_block_type == "interpolate" else "pixel_shuffle"
        set_(self, "downsample_block_type", down)
        set_(self, "upsample_block_type", up)
        set_(self, "scaling_factor", float(self.scaling_factor))
        set_(self, "encoder_out_shortcut", bool(self.encoder_out_shortcut))
        set_(self, "decoder_in_shortcut", bool(self.decoder_in_shortcut))
        set_(self, "gradient_checkpointing", bool(self.gradient_checkpointing))
        _validate(self)

    @classmethod
    def from_diffusers_config(cls, d: Mapping[str, Any]) -> DCAEConfig:
        """From a diffusers `AutoencoderDC` config (dict or parsed `config.json`).

        Keys starting with `_` (`_class_name`, `_diffusers_version`, ...) are ignored; missing keys take the
        diffusers defaults (configs older than diffusers 0.35 lack the shortcut flags and `decoder_conv_act_fn`).
        """
        if d.get("_class_name", "AutoencoderDC") != "AutoencoderDC":
            raise ValueError(f"_class_name={d['_class_name']!r}: this is not an AutoencoderDC config")
        kwargs = {k: v for k, v in d.items() if not k.startswith("_")}
        reject_unknown(sorted(kwargs), [*DIFFUSERS_KEYS, *EXTRA_KEYS], what="AutoencoderDC config")
        return cls(**kwargs)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DCAEConfig:
        """Inverse of `to_dict` (same rules as `from_diffusers_config`)."""
        return cls.from_diffusers_config(d)

    # Export --------------------------------------------------------------------------------------------
    def to_diffusers_config(self) -> dict[str, Any]:
        """The 19 `AutoencoderDC` constructor keys, JSON-ready (lists, not tuples), as in a `config.json`."""
        return {k: _to_plain(getattr(self, k)) for k in DIFFUSERS_KEYS}

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain types (safe for `torch.load(weights_only=True)` and JSON)."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> DCAEConfig:
        return dataclasses.replace(self, **changes)

    def scaled(self, width: float = 0.25, scale_latent: bool = False) -> DCAEConfig:
        """A copy with every block width multiplied by `width` (e.g. quarter-width sana-1.1 for CPU benchmarks).

        `scale_latent=True` scales `latent_channels` too, which keeps the group sizes of the latent shortcuts
        (32 / 16 / 4 for f32c32 / f64c128 / f128c512). Each width must stay a whole number (and a multiple of
        `attention_head_dim` in attention stages), which `__post_init__` checks.
        """
        if width <= 0:
            raise ValueError(f"scaled(width={width}): width must be > 0, e.g. 0.25")

        def scale(chs: tuple[int, ...], key: str) -> tuple[int, ...]:
            out = tuple(round(c * width) for c in chs)
            if any(abs(o - c * width) > 1e-6 or o < 1 for o, c in zip(out, chs, strict=True)):
                raise ValueError(f"scaled(width={width}): {key}={chs} do not scale to whole numbers ({out})")
            return out

        changes: dict[str, Any] = {
            "encoder_block_out_channels": scale(self.encoder_block_out_channels, "encoder_block_out_channels"),
            "decoder_block_out_channels": scale(self.decoder_block_out_channels, "decoder_block_out_channels"),
        }
        if scale_latent:
            changes["latent_channels"] = scale((self.latent_channels,), "latent_channels")[0]
        return self.replace(**changes)

    # Derived -------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (self.num_stages - 1)

    @property
    def takes_latent_prefixes(self) -> bool:
        """No shortcut around the latent: any channel prefix can be encoded and decoded (DC-AE 1.5)."""
        return not (self.encoder_out_shortcut or self.decoder_in_shortcut)


# Helpers ------------------------------------------------------------------------------------------------
def _int_tuple(v: Any) -> tuple[int, ...]:
    if isinstance(v, int | str):
        raise ValueError(f"expected a sequence of ints, got {v!r}")
    return tuple(int(i) for i in v)


def _per_stage(v: str | Sequence[str], n: int) -> tuple[str, ...]:
    return (v,) * n if isinstance(v, str) else tuple(str(s) for s in v)


def _to_plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_to_plain(i) for i in v]
    return v


def _validate(c: DCAEConfig) -> None:
    """Every check names the key and the fix, so a bad config fails before any tensor is allocated."""
    n = c.num_stages
    if n < 1:
        raise ValueError("encoder_block_out_channels is empty: give one width per stage, e.g. (128, 256, 512)")
    for side in ("encoder", "decoder"):
        for key in (f"{side}_block_out_channels", f"{side}_layers_per_block", f"{side}_block_types"):
            _check_len(c, key, n)
        _check_len(c, f"{side}_qkv_multiscales", n)
    _check_len(c, "decoder_norm_types", n)
    _check_len(c, "decoder_act_fns", n)
    for key in ("encoder_block_types", "decoder_block_types"):
        _check_choices(key, getattr(c, key), BLOCK_TYPES)
    _check_choices("decoder_norm_types", c.decoder_norm_types, NORM_TYPES)
    _check_choices("decoder_act_fns", c.decoder_act_fns, ACT_FNS)
    _check_choices("decoder_conv_act_fn", (c.decoder_conv_act_fn,), ACT_FNS)
    for key in ("in_channels", "latent_channels", "attention_head_dim"):
        if getattr(c, key) < 1:
            raise ValueError(f"{key}={getattr(c, key)} must be >= 1")
    for side in ("encoder", "decoder"):
        _validate_side(c, side)
    if c.encoder_out_shortcut and c.encoder_block_out_channels[-1] % c.latent_channels:
        raise ValueError(
            f"encoder_out_shortcut averages groups of encoder_block_out_channels[-1]/latent_channels channels: "
            f"{c.encoder_block_out_channels[-1]} is not a multiple of latent_channels={c.latent_channels}"
        )
    if c.decoder_in_shortcut and c.decoder_block_out_channels[-1] % c.latent_channels:
        raise ValueError(
            f"decoder_in_shortcut repeats each latent channel decoder_block_out_channels[-1]/latent_channels times: "
            f"{c.decoder_block_out_channels[-1]} is not a multiple of latent_channels={c.latent_channels}"
        )


def _check_len(c: DCAEConfig, key: str, n: int) -> None:
    if len(getattr(c, key)) != n:
        raise ValueError(
            f"{key} has {len(getattr(c, key))} entries but encoder_block_out_channels has {n} stages; "
            f"give one entry per stage"
        )


def _check_choices(key: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    for v in values:
        if v not in allowed:
            hint = " (diffusers applies layer_norm over the width axis; no released model uses it)" * (
                v == "layer_norm"
            )
            raise ValueError(f"{key}: {v!r} is not supported{hint}; use one of {', '.join(allowed)}")


def _validate_side(c: DCAEConfig, side: str) -> None:
    widths: tuple[int, ...] = getattr(c, f"{side}_block_out_channels")
    layers: tuple[int, ...] = getattr(c, f"{side}_layers_per_block")
    types: tuple[str, ...] = getattr(c, f"{side}_block_types")
    n = len(widths)
    if any(w < 1 for w in widths):
        raise ValueError(f"{side}_block_out_channels={widths}: every width must be >= 1")
    if any(num < 0 for num in layers) or any(num == 0 for num in layers[1:]):
        raise ValueError(
            f"{side}_layers_per_block={layers}: only the first stage may be empty (0 blocks); later stages need >= 1"
        )
    if n > 1 and layers[0] == 0 and widths[1] % 4 and _shuffles(c, side):
        raise ValueError(f"{side}_block_out_channels[1]={widths[1]} must be a multiple of 4 (pixel (un)shuffle)")
    for i in range(n):
        if types[i] == "EfficientViTBlock" and layers[i] and widths[i] % c.attention_head_dim:
            raise ValueError(
                f"{side}_block_out_channels[{i}]={widths[i]} must be a multiple of attention_head_dim="
                f"{c.attention_head_dim} (stage {i} has EfficientViT blocks)"
            )
        if i < n - 1 and layers[i]:
            _validate_resample(c, side, i, widths[i], widths[i + 1])


def _shuffles(c: DCAEConfig, side: str) -> bool:
    if side == "encoder":
        return c.downsample_block_type == "pixel_unshuffle"
    return c.upsample_block_type == "pixel_shuffle"


def _validate_resample(c: DCAEConfig, side: str, i: int, c_lo: int, c_hi: int) -> None:
    # Down: pixel_unshuffle gives 4*c_lo channels, averaged in groups to c_hi. Up: c_hi channels repeated to 4*c_lo.
    if (4 * c_lo) % c_hi:
        raise ValueError(
            f"{side}_block_out_channels: stages {i}->{i + 1} ({c_lo}->{c_hi}) need 4*{c_lo} to be a multiple of "
            f"{c_hi} for the residual shortcut; use widths that at most double per stage"
        )
    if side == "encoder" and c.downsample_block_type == "pixel_unshuffle" and c_hi % 4:
        raise ValueError(f"encoder_block_out_channels[{i + 1}]={c_hi} must be a multiple of 4 (pixel_unshuffle)")
