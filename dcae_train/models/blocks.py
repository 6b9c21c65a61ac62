"""DC-AE building blocks: norms, ResBlock, EfficientViT block (multi-scale ReLU linear attention + GLUMBConv),
and the residual-autoencoding down/up blocks with their parameter-free shortcuts.

Layout: NCHW in and out of ResBlocks unless the input is channels_last; EfficientViT blocks always run
channels_last (norms and attention projections then work on the NHWC view, no layout copies).
Submodule names equal the diffusers `AutoencoderDC` ones, so state_dict keys match key for key (`conv1`,
`conv2`, `norm`, `attn.to_q`, `attn.to_qkv_multiscale.0.proj_in`, `conv_out.conv_inverted`, `conv`, ...).
Facts: docs/architecture.md, "Blocks" and "Shortcuts".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Norms and activations ------------------------------------------------------------------------------------


class RMSNorm2d(nn.Module):
    """RMSNorm over channels with weight and bias: y = x * rsqrt(mean_c(x^2) + eps) * w + b.

    The statistics and the normalisation run in fp32. The result is cast to the weight dtype when the weights
    are fp16/bf16, else back to the input dtype (diffusers returns fp32 for bf16 inputs with fp32 weights; the
    original [E] code returns the input dtype, which keeps autocast activations in bf16).
    """

    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if _is_nhwc(x):  # channels_last: normalise the contiguous last dim of the NHWC view, stay channels_last
            xf = F.rms_norm(x.float().movedim(1, -1), (x.shape[1],), None, self.eps)  # (B, H, W, C), fp32
            w, b = self.weight, self.bias
            if w.dtype in (torch.float16, torch.bfloat16):
                return torch.addcmul(b, xf.to(w.dtype), w).movedim(-1, 1)
            return torch.addcmul(b.float(), xf, w.float()).to(dtype).movedim(-1, 1)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps)  # (B, C, H, W), fp32
        w, b = self.weight[:, None, None], self.bias[:, None, None]
        if w.dtype in (torch.float16, torch.bfloat16):
            return torch.addcmul(b, xf.to(w.dtype), w)
        return torch.addcmul(b.float(), xf, w.float()).to(dtype)


def _is_nhwc(x: torch.Tensor) -> bool:
    """True for a channels_last tensor that is not also NCHW-contiguous (C > 1 and H * W > 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def build_norm(norm_type: str, num_channels: int) -> nn.Module:
    if norm_type == "rms_norm":
        return RMSNorm2d(num_channels)
    if norm_type == "batch_norm":
        return nn.BatchNorm2d(num_channels, eps=1e-5, momentum=0.1)
    raise ValueError(f"norm type {norm_type!r} is not supported; use rms_norm or batch_norm")


def build_act(act_fn: str) -> nn.Module:
    acts = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU, "mish": nn.Mish, "gelu": nn.GELU}
    if act_fn not in acts:
        raise ValueError(f"activation {act_fn!r} is not supported; use one of {', '.join(acts)}")
    return acts[act_fn]()


# ResBlock -------------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + Norm(conv2(Act(conv1(x)))); conv1 3x3 with bias, conv2 3x3 without."""

    def __init__(self, channels: int, norm_type: str = "rms_norm", act_fn: str = "silu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.act = build_act(act_fn)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm = build_norm(norm_type, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.conv2(self.act(self.conv1(x))))  # (B, C, H, W)


# EfficientViT block ---------------------------------------------------------------------------------------


class MultiscaleProjection(nn.Module):
    """One extra attention scale: depthwise kxk conv, then a 1x1 conv grouped per q/k/v head (no biases)."""

    def __init__(self, qkv_channels: int, num_groups: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(
            qkv_channels, qkv_channels, kernel_size, padding=kernel_size // 2, groups=qkv_channels, bias=False
        )
        self.proj_out = nn.Conv2d(qkv_channels, qkv_channels, 1, groups=num_groups, bias=False)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(qkv))


class MultiscaleLinearAttention(nn.Module):
    """Multi-scale ReLU linear attention ([E] LiteMLA) with its residual: x + norm_out(to_out(attn(qkv(x)))).

    Heads take *consecutive* groups of 3*head_dim channels of [q | k | v | scale-1 qkv ...]: group g is
    channels 96g..96g+95 (q = first 32, k = next 32, v = last 32), not per-head slices of to_q/to_k/to_v.
    The released weights depend on this grouping.
    """

    def __init__(
        self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (), norm_type: str = "rms_norm"
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.eps = 1e-15
        heads = channels // head_dim
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, 3 * heads, k) for k in scales)
        self.to_out = nn.Linear(channels * (1 + len(scales)), channels, bias=False)
        self.norm_out = build_norm(norm_type, channels)
        # Set only by `dcae_train.tiling` while it runs: attention over the whole image's sums, not the tile's.
        self.tile_context: object | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        nhwc = _is_nhwc(x)  # channels_last in, channels_last out: project the NHWC view, no layout copies
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3C, C): one matmul, not three
        # per-pixel projection, (B, 3C, H, W) = [q | k | v]
        qkv = (x.movedim(1, -1) @ w_qkv.t()).movedim(-1, 1) if nhwc else (w_qkv @ x.flatten(2)).view(B, 3 * C, H, W)
        qkv = torch.cat([qkv, *(scale(qkv) for scale in self.to_qkv_multiscale)], dim=1)  # (B, 3C(1+S), H, W)
        qkv = qkv.reshape(B, -1, 3 * self.head_dim, H * W)  # (B, G, 3d, N): consecutive channel groups
        n_tokens = H * W  # linear form above head_dim tokens, the N x N form at or below (as published)
        out = self._attend(qkv, linear=n_tokens > self.head_dim, hw=(H, W))  # (B, G, d, N), input dtype
        if nhwc:
            out = (out.reshape(B, -1, H * W).transpose(1, 2) @ self.to_out.weight.t()).view(B, H, W, C)
            return x + self.norm_out(out.movedim(-1, 1))  # channels_last
        out = self.to_out.weight @ out.reshape(B, -1, H * W)  # (B, C, N)
        return x + self.norm_out(out.view(B, C, H, W))

    def _attend(self, qkv: torch.Tensor, linear: bool, hw: tuple[int, int]) -> torch.Tensor:
        dtype = qkv.dtype
        # fp32 and autocast off: the eps of 1e-15 and the sums over N are meaningless in bf16/fp16.
        with torch.autocast(qkv.device.type, enabled=False):
            q, k, v = qkv.float().chunk(3, dim=2)  # each (B, G, d, N)
            q, k = F.relu(q), F.relu(k)
            if self.tile_context is not None:  # tiled encode/decode: the image's sums (dcae_train.tiling)
                out = self.tile_context.attend(self, q, k, v, hw)  # type: ignore[attr-defined]
            elif linear:
                out = _linear_attention(q, k, v, self.eps)
            else:
                out = _quadratic_attention(q, k, v, self.eps)
        return out.to(dtype)


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps), in O(N d^2)."""
    vk = v @ k.transpose(-1, -2)  # (B, G, d, d)
    num = vk @ q  # (B, G, d, N)
    den = k.sum(dim=-1, keepdim=True).transpose(-1, -2) @ q  # (B, G, 1, N)
    return num / (den + eps)


def _quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The same attention through the N x N matrix; used when N <= head_dim, where it is cheaper."""
    a = k.transpose(-1, -2) @ q  # (B, G, N_k, N_q)
    a = a / (a.sum(dim=2, keepdim=True) + eps)  # normalise over keys
    return v @ a  # (B, G, d, N)


class GLUMBConv(nn.Module):
    """Gated inverted bottleneck: 1x1 C->8C + SiLU, depthwise 3x3, a * SiLU(gate), 1x1 4C->C, RMSNorm, residual."""

    def __init__(self, channels: int, expand: int = 4) -> None:
        super().__init__()
        hidden = expand * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(F.silu(self.conv_inverted(x)))  # (B, 8C, H, W)
        a, gate = h.chunk(2, dim=1)  # (B, 4C, H, W) each
        return x + self.norm(self.conv_point(a * F.silu(gate)))  # (B, C, H, W)


class EfficientViTBlock(nn.Module):
    """x <- x + Attn(x) (context); x <- x + GLUMBConv(x) (local). Both residuals live inside the submodules."""

    def __init__(
        self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (), norm_type: str = "rms_norm"
    ) -> None:
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, scales, norm_type)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last inside: the 1x1, depthwise and grouped convs here run faster on NHWC (oneDNN, cuDNN); a
        # no-op after the first block of a stage. diffusers ends up the same way (its RMSNorm permutes back).
        return self.conv_out(self.attn(x.contiguous(memory_format=torch.channels_last)))


def build_block(
    block_type: str, channels: int, head_dim: int, norm_type: str, act_fn: str, scales: tuple[int, ...]
) -> nn.Module:
    if block_type == "ResBlock":
        return ResBlock(channels, norm_type, act_fn)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim, scales, norm_type)  # act_fn unused, as in diffusers
    raise ValueError(f"block type {block_type!r} is not supported; use ResBlock or EfficientViTBlock")


# Residual autoencoding: down/up blocks and the shortcuts ---------------------------------------------------


def space_to_channel_average(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Shortcut 1: pixel_unshuffle(x, 2) (4C channels, ordered 4c + 2dy + dx), then the mean of consecutive
    groups of 4C/out_channels channels. (B, C, H, W) -> (B, out_channels, H/2, W/2)."""
    s = F.pixel_unshuffle(x, 2)  # (B, 4C, H/2, W/2)
    return s.unflatten(1, (out_channels, -1)).mean(dim=2)


def channel_to_space_duplicate(x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """Shortcut 2: repeat each channel 4*out_channels/C times consecutively, then pixel_shuffle(x, 2).
    (B, C, H, W) -> (B, out_channels, 2H, 2W)."""
    repeats = 4 * out_channels // x.shape[1]
    return F.pixel_shuffle(x.repeat_interleave(repeats, dim=1), 2)


class DownBlock(nn.Module):
    """Halves H and W: conv (stride 2, or 3x3 + pixel_unshuffle) [+ space-to-channel average shortcut]."""

    def __init__(self, in_channels: int, out_channels: int, pixel_unshuffle: bool, shortcut: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        if pixel_unshuffle:
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, 1, 1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = F.pixel_unshuffle(h, 2)  # (B, Cout, H/2, W/2)
        return h + space_to_channel_average(x, self.out_channels) if self.shortcut else h


class UpBlock(nn.Module):
    """Doubles H and W: nearest x2 + 3x3 conv (interpolate) or 3x3 conv + pixel_shuffle
    [+ channel-duplicate-to-space shortcut]."""

    def __init__(self, in_channels: int, out_channels: int, interpolate: bool, shortcut: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.conv = nn.Conv2d(in_channels, out_channels if interpolate else 4 * out_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, Cout, 2H, 2W)
        else:
            h = F.pixel_shuffle(self.conv(x), 2)  # (B, Cout, 2H, 2W)
        return h + channel_to_space_duplicate(x, self.out_channels) if self.shortcut else h
