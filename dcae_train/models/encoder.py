"""DC-AE encoder: conv_in -> stages (blocks, then a down block) -> conv_out + the latent shortcut.

conv_in       3x3 conv 3->C0 (first stage non-empty) or a down block 3->C1 without shortcut (first stage empty)
down_blocks.i Li blocks at Ci, then a down block Ci->C(i+1) with shortcut (if i < n-1 and Li > 0)
conv_out      3x3 conv C(n-1)->latent, plus shortcut 3: the mean of consecutive channel groups of h
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcae_train.models.blocks import DownBlock, build_block
from dcae_train.models.checkpointing import Stage
from dcae_train.models.config import DCAEConfig

Prefixes = int | list[int] | tuple[int, ...] | None  # latent channel prefixes to encode (None: all channels)
Latents = torch.Tensor | list[torch.Tensor]


class Encoder(nn.Module):
    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        c = config
        widths, layers, n = c.encoder_block_out_channels, c.encoder_layers_per_block, c.num_stages
        unshuffle = c.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in: nn.Module = nn.Conv2d(c.in_channels, widths[0], 3, 1, 1)
        else:
            self.conv_in = DownBlock(c.in_channels, widths[1], unshuffle, shortcut=False)
        stages = []
        for i in range(n):
            blocks = [
                build_block(
                    c.encoder_block_types[i],
                    widths[i],
                    c.attention_head_dim,
                    "rms_norm",
                    "silu",
                    c.encoder_qkv_multiscales[i],
                )  # fmt: skip
                for _ in range(layers[i])
            ]  # encoder blocks always use RMSNorm + SiLU
            if i < n - 1 and layers[i] > 0:
                blocks.append(DownBlock(widths[i], widths[i + 1], unshuffle, shortcut=True))
            stages.append(Stage(*blocks))  # an empty stage holds no keys
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], c.latent_channels, 3, 1, 1)
        self.out_shortcut = c.encoder_out_shortcut
        self.latent_channels = c.latent_channels

    def forward(self, x: torch.Tensor, latent_channels: Prefixes = None) -> Latents:
        return self.forward_head(self.forward_body(x), latent_channels)

    def forward_skipping_frozen(self, x: torch.Tensor, latent_channels: Prefixes = None) -> Latents:
        """forward(x), without an autograd graph through what does not train (phase 2 trains only the head)."""
        if not any(p.requires_grad for p in self.parameters()):
            with torch.no_grad():
                return self(x, latent_channels)
        if any(p.requires_grad for p in self._body_parameters()):
            return self(x, latent_channels)
        with torch.no_grad():
            h = self.forward_body(x)
        return self.forward_head(h, latent_channels)

    def _body_parameters(self):
        return (p for name, p in self.named_parameters() if not name.startswith("conv_out."))

    def forward_body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W), or (B, C1, H/2, W/2) when the first stage is empty
        for stage in self.down_blocks:
            h = stage(h)  # ... -> (B, C(n-1), H/f, W/f)
        return h

    def forward_head(self, h: torch.Tensor, latent_channels: Prefixes = None) -> Latents:
        """The latent, or its first `latent_channels` channels; a list of prefixes gives one latent each, all
        from the one body pass `h`."""
        if isinstance(latent_channels, list | tuple):
            return [self._head(h, c) for c in latent_channels]
        return self._head(h, latent_channels)

    def _head(self, h: torch.Tensor, c: int | None) -> torch.Tensor:
        if c is None or c == self.latent_channels:
            z = self.conv_out(h)  # (B, c_lat, H/f, W/f)
        else:  # only the first c filters run (DC-AE 1.5): equal to slicing the full latent, at c/c_lat the cost
            z = F.conv2d(h, self.conv_out.weight[:c], self.conv_out.bias[:c], padding=1)  # (B, c, H/f, W/f)
        if self.out_shortcut:  # DCAE refuses prefixes on variants with this shortcut
            z = z + h.unflatten(1, (self.latent_channels, -1)).mean(dim=2)  # channel averaging to c_lat
        return z
