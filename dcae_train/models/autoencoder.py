"""`DCAE`: the deep-compression autoencoder (encoder + decoder), state_dict-identical to diffusers `AutoencoderDC`.

No posterior, no KL: `encode` is deterministic and returns the *unscaled* latent. Diffusion models see
`encode(x) * scaling_factor` (`encode_scaled`) and decoding inverts it with `decode(z / scaling_factor)`
(`decode_scaled`); there is no shift.
"""

from __future__ import annotations

import torch
from torch import nn

from dcae_train.models import tiling
from dcae_train.models.checkpointing import Stage
from dcae_train.models.config import DCAEConfig
from dcae_train.models.decoder import Decoder
from dcae_train.models.encoder import Encoder, Latents, Prefixes
from dcae_train.models.variants import variant_config, variant_name


class DCAE(nn.Module):
    """Images (B, in_channels, H, W) in [-1, 1] <-> latents (B, latent_channels, H/f, W/f), f = 2^(stages-1)."""

    def __init__(self, config: DCAEConfig, variant: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.variant = variant  # the registered name (exports record it), None for a custom architecture
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.set_gradient_checkpointing(config.gradient_checkpointing)

    # Properties ----------------------------------------------------------------------------------------
    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    def set_gradient_checkpointing(self, enabled: bool = True) -> DCAE:
        """Checkpoint every block (and the decoder head) in training: activations are recomputed in backward."""
        for m in self.modules():
            if isinstance(m, Stage | Decoder):
                m.gradient_checkpointing = bool(enabled)
        self.config = self.config.replace(gradient_checkpointing=bool(enabled))
        return self

    # API -----------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor, latent_channels: Prefixes = None) -> Latents:
        """(B, C, H, W) in [-1, 1] -> unscaled latent (B, c_lat, H/f, W/f). H and W must be multiples of f.

        `latent_channels=c` (variants without a shortcut around the latent, DC-AE 1.5): the first c channels,
        computed with only the first c filters of the output conv; a list of prefixes returns one latent each,
        all from one pass through the encoder body."""
        self._check_image(x)
        self._check_prefixes(latent_channels)
        return self.encoder(x, latent_channels)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent (B, c, h, w) -> image (B, C, h*f, w*f), not clamped. c is c_lat, or any prefix c <= c_lat
        on variants that take prefixes (the decoder's first conv uses its first c input channels: zero-padding)."""
        self._check_latent(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction decode(encode(x)), without scaling_factor (as diffusers)."""
        return self.decode(self.encode(x))

    def reconstruct(self, x: torch.Tensor, latent_channels: list[int] | None = None) -> tuple[list, list]:
        """([z], [x_hat]) for training, one pair per latent prefix (one pair of the full latent by default): no
        autograd graph is kept through the frozen part before the first layer that trains (phase 2: the encoder
        body; phase 3: everything before the decoder head). The prefixes share one encoder body pass."""
        self._check_image(x)
        self._check_prefixes(latent_channels)
        zs = self.encoder.forward_skipping_frozen(x, latent_channels if latent_channels else [None])
        return zs, [self.decoder.forward_skipping_frozen(z) for z in zs]  # [(B, c, H/f, W/f)], [(B, 3, H, W)]

    def last_trainable_layer(self) -> torch.Tensor | None:
        """The weight of the decoder's last trainable conv: where the adaptive GAN weight compares gradients."""
        return self.decoder.last_trainable_weight()

    def encoder_last_layer(self) -> torch.Tensor:
        """The weight of the encoder's output conv (the latent's last layer): where the adaptive VF weight compares
        gradients (VA-VAE: `encoder.conv_out.weight`)."""
        return self.encoder.conv_out.weight

    def feature_module(self, where: str, stage: int) -> nn.Module:
        """The stage whose output is an intermediate feature (REPA-style alignment): `encoder.down_blocks[stage]`
        or `decoder.up_blocks[stage]` (the decoder runs its stages deepest first)."""
        stages = {"encoder": self.encoder.down_blocks, "decoder": self.decoder.up_blocks}[where]
        if not 0 <= stage < len(stages):
            raise ValueError(f"{where} stage {stage}: this model's {where} has stages 0..{len(stages) - 1}")
        return stages[stage]

    def feature_channels(self, where: str, stage: int) -> int:
        """Channels of `feature_module(where, stage)`'s output, probed with one small no-grad forward."""
        seen: list[int] = []
        handle = self.feature_module(where, stage).register_forward_hook(lambda m, i, out: seen.append(out.shape[1]))
        f = self.spatial_compression_ratio
        try:
            with torch.no_grad():
                p = next(self.parameters())
                self.decode(self.encode(torch.zeros(1, self.config.in_channels, f, f, device=p.device, dtype=p.dtype)))
        finally:
            handle.remove()
        return seen[0]

    def encode_scaled(self, x: torch.Tensor) -> torch.Tensor:
        """The latent a diffusion model sees: encode(x) * scaling_factor."""
        return self.encode(x) * self.scaling_factor

    def decode_scaled(self, z: torch.Tensor) -> torch.Tensor:
        """Decode a diffusion-model latent: decode(z / scaling_factor)."""
        return self.decode(z / self.scaling_factor)

    def tiled_encode(
        self,
        x: torch.Tensor,
        tile: int | None = None,
        overlap: int | None = None,
        global_attention: bool = False,
        latent_channels: int | None = None,
    ) -> torch.Tensor:
        """Encode any size in overlapping tiles (bounded memory); see `dcae_train.models.tiling.tiled_encode`."""
        return tiling.tiled_encode(
            self, x, tile=tile, overlap=overlap, global_attention=global_attention, latent_channels=latent_channels
        )

    def tiled_decode(
        self, z: torch.Tensor, tile: int | None = None, overlap: int | None = None, global_attention: bool = True
    ) -> torch.Tensor:
        """Decode in overlapping latent tiles, attention over the whole latent; see `dcae_train.models.tiling`."""
        return tiling.tiled_decode(self, z, tile=tile, overlap=overlap, global_attention=global_attention)

    # Input checks (before any compute) -----------------------------------------------------------------
    def _check_image(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"encode: expected images (B, {c}, H, W), got shape {tuple(x.shape)}")
        f = self.spatial_compression_ratio
        for name, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % f:
                lo, hi = size // f * f, (size // f + 1) * f
                nearest = f"{lo} or {hi}" if lo else f"{hi}"
                raise ValueError(
                    f"encode: image {name} {size} is not a multiple of the spatial compression ratio {f}; "
                    f"nearest valid sizes: {nearest} (crop or pad, or use tiled_encode for any size)"
                )

    def _check_latent(self, z: torch.Tensor) -> None:
        c = self.config.latent_channels
        prefix = self.config.takes_latent_prefixes and z.ndim == 4 and 1 <= z.shape[1] < c
        if z.ndim != 4 or not (z.shape[1] == c or prefix):
            takes = f" or a prefix (B, 1..{c}, h, w)" if self.config.takes_latent_prefixes else ""
            raise ValueError(f"decode: expected latents (B, {c}, h, w){takes}, got shape {tuple(z.shape)}")

    def _check_prefixes(self, latent_channels: Prefixes) -> None:
        if latent_channels is None:
            return
        c = self.config.latent_channels
        if not self.config.takes_latent_prefixes:
            raise ValueError(
                f"latent_channels={latent_channels}: this variant has a shortcut around the latent "
                "(encoder_out_shortcut/decoder_in_shortcut), so a channel prefix is not a latent its decoder can "
                "read; prefixes need a variant without it (DC-AE 1.5: dc-ae-f32c128-1.5, dc-ae-f64c128-1.5, tiny-1.5)"
            )
        prefixes = latent_channels if isinstance(latent_channels, list | tuple) else [latent_channels]
        bad = [p for p in prefixes if isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= c]
        if bad or not prefixes:
            raise ValueError(f"latent_channels={latent_channels}: each prefix must be an int in 1..{c}, e.g. {c // 2}")


def build_model(name_or_config: str | DCAEConfig) -> DCAE:
    """A randomly initialised `DCAE` from a variant name (see `VARIANTS`) or a `DCAEConfig`."""
    if isinstance(name_or_config, DCAEConfig):
        return DCAE(name_or_config)
    if not isinstance(name_or_config, str):
        raise ValueError(
            f"build_model: expected a variant name or a DCAEConfig, got {type(name_or_config).__name__}; "
            f"for a diffusers config dict use build_model(DCAEConfig.from_diffusers_config(d))"
        )
    return DCAE(variant_config(name_or_config), variant=variant_name(name_or_config))
