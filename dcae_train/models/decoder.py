"""DC-AE decoder: conv_in + the latent shortcut -> stages (up block, then blocks), deepest first -> head.

    conv_in      3x3 conv latent->C(n-1), plus shortcut 4: each latent channel repeated C(n-1)/latent times
    up_blocks.i  an up block C(i+1)->Ci with shortcut (if i < n-1 and Li > 0), then Li blocks; stored by stage
                 index i but run from n-1 down to 0
    head         norm_out (RMSNorm over Ch, with bias) -> decoder_conv_act_fn -> conv_out (3x3 conv Ch->3,
                 or an up block Ch->3 without shortcut when the first stage is empty); Ch = C0 or C1
Phase 3 of the recipe trains only the head (`decoder.norm_out.*`, `decoder.conv_out.*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dcae_train.models.blocks import RMSNorm2d, UpBlock, build_act, build_block
from dcae_train.models.checkpointing import Stage, run_block
from dcae_train.models.config import DCAEConfig


class Decoder(nn.Module):
    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        c = config
        widths, layers, n = c.decoder_block_out_channels, c.decoder_layers_per_block, c.num_stages
        interpolate = c.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(c.latent_channels, widths[-1], 3, 1, 1)
        self.in_shortcut = c.decoder_in_shortcut
        stages = []
        for i in range(n):
            blocks: list[nn.Module] = []
            if i < n - 1 and layers[i] > 0:
                blocks.append(UpBlock(widths[i + 1], widths[i], interpolate, shortcut=True))
            blocks += [
                build_block(
                    c.decoder_block_types[i],
                    widths[i],
                    c.attention_head_dim,
                    c.decoder_norm_types[i],
                    c.decoder_act_fns[i],
                    c.decoder_qkv_multiscales[i],
                )  # fmt: skip
                for _ in range(layers[i])
            ]
            stages.append(Stage(*blocks))
        self.up_blocks = nn.ModuleList(stages)
        head_channels = widths[0] if layers[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(head_channels)
        self.conv_act = build_act(c.decoder_conv_act_fn)
        if layers[0] > 0:
            self.conv_out: nn.Module = nn.Conv2d(head_channels, c.in_channels, 3, 1, 1)
        else:
            self.conv_out = UpBlock(head_channels, c.in_channels, interpolate, shortcut=False)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_body(z))  # (B, 3, H, W)

    def forward_skipping_frozen(self, z: torch.Tensor) -> torch.Tensor:
        """forward(z), the body without an autograd graph when neither it nor the latent needs one (phase 3)."""
        body_trains = any(p.requires_grad for m in self._body() for p in m.parameters())
        if z.requires_grad or body_trains:
            return self(z)
        with torch.no_grad():
            h = self.forward_body(z)
        return self.forward_head(h)

    def last_trainable_weight(self) -> torch.Tensor | None:
        """The weight of the last conv, in forward order, that trains (None when no conv of the decoder trains)."""
        for module in reversed([*self._body(), self.conv_out]):
            convs = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight.requires_grad]
            if convs:
                return convs[-1].weight
        return None

    def _body(self) -> list[nn.Module]:
        """The modules before the head, in forward order (the stages run deepest first)."""
        return [self.conv_in, *reversed(self.up_blocks)]

    def forward_body(self, z: torch.Tensor) -> torch.Tensor:
        h = self._conv_in(z)  # (B, C(n-1), h, w)
        if self.in_shortcut:
            h = h + z.repeat_interleave(h.shape[1] // z.shape[1], dim=1)  # channel duplicating
        for stage in reversed(self.up_blocks):
            h = stage(h)  # ... -> (B, Ch, H, W) (H/2 when the first stage is empty)
        return h

    def _conv_in(self, z: torch.Tensor) -> torch.Tensor:
        c = z.shape[1]
        if c == self.conv_in.in_channels:
            return self.conv_in(z)
        # A channel prefix (DC-AE 1.5): only the first c input channels of the conv, which equals zero-padding z.
        return F.conv2d(z, self.conv_in.weight[:, :c], self.conv_in.bias, padding=1)

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        return run_block(self._head, h, self.gradient_checkpointing, [self.norm_out, self.conv_out])  # (B, 3, H, W)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv_act(self.norm_out(h)))
