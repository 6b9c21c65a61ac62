"""Original (mit-han-lab/efficientvit, DC-Gen) <-> diffusers `AutoencoderDC` state-dict keys, as pure functions.

The two layouts hold the same tensors (docs/weights.md, "Original layout"). Differences:

- names: `encoder.stages.i.op_list.j.` <-> `encoder.down_blocks.i.j.`, `decoder.stages` <-> `decoder.up_blocks`,
  `project_in/out` <-> `conv_in/out` / `norm_out`, `context_module` <-> `attn`, `local_module` <-> `conv_out`;
- the fused attention projection `qkv.conv.weight` (3C, C, 1, 1) <-> `to_q/to_k/to_v.weight` (C, C) each;
- `proj.conv.weight` (C, C(1+S), 1, 1) <-> `to_out.weight` (C, C(1+S)): 1x1 conv vs linear;
- a down/up block is `conv.conv.*` in the original when it is a (un)shuffle or interpolate layer and `conv.*` when
  it is a stride-2 conv, while diffusers always writes `conv.*`. Which one applies depends on the config (stage 0
  empty or not, downsample type), so both directions take the `DCAEConfig`. diffusers' single-file converter
  guesses it from one key and gets lite (plain encoder stem, empty decoder stage 0) wrong; we don't guess.

Every multiscale index is mapped (`aggreg.<s>.0/1`), not just 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from dcae_train.models.config import DCAEConfig

Tensor = torch.Tensor

# Inside a block: original suffix -> diffusers suffix (regex, replacement).
_BLOCK_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^main\.conv1\.conv\.(weight|bias)$", r"conv1.\1"),
        (r"^main\.conv2\.conv\.weight$", r"conv2.weight"),
        (r"^main\.conv2\.norm\.(\w+)$", r"norm.\1"),  # RMSNorm weight/bias or BatchNorm incl. running stats
        (r"^main\.conv\.(?:conv\.)?(weight|bias)$", r"conv.\1"),  # down/up block
        (r"^context_module\.main\.aggreg\.(\d+)\.0\.weight$", r"attn.to_qkv_multiscale.\1.proj_in.weight"),
        (r"^context_module\.main\.aggreg\.(\d+)\.1\.weight$", r"attn.to_qkv_multiscale.\1.proj_out.weight"),
        (r"^context_module\.main\.proj\.norm\.(\w+)$", r"attn.norm_out.\1"),
        (r"^local_module\.main\.inverted_conv\.conv\.(weight|bias)$", r"conv_out.conv_inverted.\1"),
        (r"^local_module\.main\.depth_conv\.conv\.(weight|bias)$", r"conv_out.conv_depth.\1"),
        (r"^local_module\.main\.point_conv\.conv\.weight$", r"conv_out.conv_point.weight"),
        (r"^local_module\.main\.point_conv\.norm\.(\w+)$", r"conv_out.norm.\1"),
    )
)
_STAGE = re.compile(r"^(encoder|decoder)\.stages\.(\d+)\.op_list\.(\d+)\.(.+)$")
_DIFF_STAGE = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(\d+)\.(.+)$")
_QKV = "context_module.main.qkv.conv.weight"
_PROJ = "context_module.main.proj.conv.weight"


class ConversionError(ValueError):
    """A key or shape that the original <-> diffusers mapping does not know."""


# Original -> diffusers ----------------------------------------------------------------------------------
def original_to_diffusers(sd: Mapping[str, Tensor], config: DCAEConfig) -> dict[str, Tensor]:
    """Original efficientvit/DC-Gen state dict -> diffusers/`DCAE` keys for the architecture `config`.

    Raises `ConversionError` naming the first key that does not belong to the original layout.
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        for new_key, new_value in _convert_original_key(key, value, config):
            if new_key in out:
                raise ConversionError(f"{key}: maps onto {new_key}, which another key already produced")
            out[new_key] = new_value
    return out


def _convert_original_key(key: str, v: Tensor, config: DCAEConfig) -> list[tuple[str, Tensor]]:
    m = _STAGE.match(key)
    if m:
        side, i, j, rest = m.groups()
        prefix = f"{'encoder.down_blocks' if side == 'encoder' else 'decoder.up_blocks'}.{i}.{j}."
        if rest == _QKV:  # (3C, C, 1, 1) -> q, k, v (C, C): consecutive thirds, in q, k, v order
            q, k, val = v.reshape(v.shape[0], -1).chunk(3, dim=0)
            return [(prefix + f"attn.to_{n}.weight", t.contiguous()) for n, t in zip("qkv", (q, k, val), strict=True)]
        if rest == _PROJ:  # (C, C(1+S), 1, 1) -> (C, C(1+S))
            return [(prefix + "attn.to_out.weight", v.reshape(v.shape[0], -1))]
        for pattern, repl in _BLOCK_RULES:
            if pattern.match(rest):
                return [(prefix + pattern.sub(repl, rest), v)]
        raise ConversionError(f"{key}: unknown block parameter {rest!r} in an original DC-AE checkpoint")
    return [(_convert_original_top(key, config), v)]


def _convert_original_top(key: str, config: DCAEConfig) -> str:
    # A plain conv stem, or a stride-2 conv down block when stage 0 is empty (and likewise for the head).
    enc_stem = r"encoder.conv_in.conv.\1" if config.encoder_layers_per_block[0] == 0 else r"encoder.conv_in.\1"
    dec_head = r"decoder.conv_out.conv.\1" if config.decoder_layers_per_block[0] == 0 else r"decoder.conv_out.\1"
    rules = (
        (r"^encoder\.project_in\.conv\.conv\.(weight|bias)$", r"encoder.conv_in.conv.\1"),
        (r"^encoder\.project_in\.conv\.(weight|bias)$", enc_stem),
        (r"^encoder\.project_out\.(?:main\.)?op_list\.0\.conv\.(weight|bias)$", r"encoder.conv_out.\1"),
        (r"^decoder\.project_in\.(?:main\.)?conv\.(weight|bias)$", r"decoder.conv_in.\1"),
        (r"^decoder\.project_out\.op_list\.0\.(weight|bias)$", r"decoder.norm_out.\1"),
        (r"^decoder\.project_out\.op_list\.2\.conv\.conv\.(weight|bias)$", r"decoder.conv_out.conv.\1"),
        (r"^decoder\.project_out\.op_list\.2\.conv\.(weight|bias)$", dec_head),
    )
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    raise ConversionError(f"{key}: not a key of an original DC-AE checkpoint (efficientvit / DC-Gen layout)")


# Diffusers -> original ----------------------------------------------------------------------------------
def diffusers_to_original(sd: Mapping[str, Tensor], config: DCAEConfig) -> dict[str, Tensor]:
    """Inverse of `original_to_diffusers`: `DCAE`/diffusers keys -> the efficientvit/DC-Gen layout."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # original qkv key -> {"q": .., "k": .., "v": ..}
    for key, v in sd.items():
        m = _DIFF_STAGE.match(key)
        if m and m.group(4) in ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"):
            orig = _original_stage_prefix(m) + _QKV
            qkv.setdefault(orig, {})[m.group(4)[len("attn.to_")]] = v
            continue
        if m and m.group(4) == "attn.to_out.weight":
            out[_original_stage_prefix(m) + _PROJ] = v.reshape(*v.shape, 1, 1)
            continue
        new_key = _original_stage_key(m, config) if m else _original_top_key(key, config)
        out[new_key] = v
    for orig, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ConversionError(f"{orig}: needs to_q, to_k and to_v; got only {sorted(parts)}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # (3C, C)
        out[orig] = fused.reshape(*fused.shape, 1, 1)
    return out


def _original_stage_prefix(m: re.Match[str]) -> str:
    side = "encoder" if m.group(1).startswith("encoder") else "decoder"
    return f"{side}.stages.{m.group(2)}.op_list.{m.group(3)}."


def _original_stage_key(m: re.Match[str], config: DCAEConfig) -> str:
    prefix, rest = _original_stage_prefix(m), m.group(4)
    is_encoder = m.group(1).startswith("encoder")
    if rest in ("conv.weight", "conv.bias"):
        # Up blocks are always a layer wrapping a conv; down blocks only when they pixel_unshuffle.
        wrapped = not is_encoder or config.downsample_block_type == "pixel_unshuffle"
        return prefix + ("main.conv.conv." if wrapped else "main.conv.") + rest.split(".")[-1]
    inverse = (
        (r"^conv1\.(weight|bias)$", r"main.conv1.conv.\1"),
        (r"^conv2\.weight$", r"main.conv2.conv.weight"),
        (r"^norm\.(\w+)$", r"main.conv2.norm.\1"),
        (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_in\.weight$", r"context_module.main.aggreg.\1.0.weight"),
        (r"^attn\.to_qkv_multiscale\.(\d+)\.proj_out\.weight$", r"context_module.main.aggreg.\1.1.weight"),
        (r"^attn\.norm_out\.(\w+)$", r"context_module.main.proj.norm.\1"),
        (r"^conv_out\.conv_inverted\.(weight|bias)$", r"local_module.main.inverted_conv.conv.\1"),
        (r"^conv_out\.conv_depth\.(weight|bias)$", r"local_module.main.depth_conv.conv.\1"),
        (r"^conv_out\.conv_point\.weight$", r"local_module.main.point_conv.conv.weight"),
        (r"^conv_out\.norm\.(\w+)$", r"local_module.main.point_conv.norm.\1"),
    )
    for pattern, repl in inverse:
        if re.match(pattern, rest):
            return prefix + re.sub(pattern, repl, rest)
    raise ConversionError(f"{m.group(0)}: unknown block parameter {rest!r} in a diffusers AutoencoderDC state dict")


def _original_top_key(key: str, config: DCAEConfig) -> str:
    unshuffle = config.downsample_block_type == "pixel_unshuffle"
    # The shortcut wraps the layer in a ResidualBlock, which adds `main.` to the original key.
    enc_out = "encoder.project_out." + ("main." if config.encoder_out_shortcut else "") + "op_list.0.conv."
    dec_in = "decoder.project_in.main.conv." if config.decoder_in_shortcut else "decoder.project_in.conv."
    prefixes = (
        ("encoder.conv_in.conv.", "encoder.project_in.conv.conv." if unshuffle else "encoder.project_in.conv."),
        ("encoder.conv_in.", "encoder.project_in.conv."),
        ("encoder.conv_out.", enc_out),
        ("decoder.conv_in.", dec_in),
        ("decoder.norm_out.", "decoder.project_out.op_list.0."),
        ("decoder.conv_out.conv.", "decoder.project_out.op_list.2.conv.conv."),
        ("decoder.conv_out.", "decoder.project_out.op_list.2.conv."),
    )
    for old, new in prefixes:
        tail = key[len(old) :]
        if key.startswith(old) and tail in ("weight", "bias"):
            return new + tail
    raise ConversionError(f"{key}: not a key of a diffusers AutoencoderDC state dict")


def looks_original(keys: set[str] | list[str]) -> bool:
    """True for the efficientvit/DC-Gen layout (it has `project_in`/`stages`, diffusers has `conv_in`/`*_blocks`)."""
    return any(k.startswith(("encoder.project_in.", "encoder.stages.", "decoder.stages.")) for k in keys)
