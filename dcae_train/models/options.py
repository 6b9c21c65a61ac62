"""`ModelConfig`: the run's `model:` node. Which variant to train and how it runs; the architecture itself is the
variant's `DCAEConfig` in `variants.py`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from dcae_train.models.variants import VARIANTS, variant_config
from dcae_train.schema import check_choice


@dataclass
class ModelConfig:
    variant: str = "tiny"  # a name of dcae_train.models.VARIANTS; `model=<name>` on the command line sets it
    gradient_checkpointing: bool = False  # per-block activation checkpointing: less activation memory, one more forward
    channels_last: bool = False  # NHWC memory format for the model and the batches (faster convs on recent GPUs)
    compile: bool = False  # in-place module.compile() (state_dict keys unchanged)

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)

    @property
    def spatial_compression(self) -> int:
        return variant_config(self.variant).spatial_compression_ratio
