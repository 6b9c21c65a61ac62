"""`EvaluationConfig`: protocol metrics on a fixed validation subset during training (the run's `evaluation`).
Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from dcae_train.schema import check_at_least, check_choice, require

LPIPS_CHOICES = ("alex", "vgg", "random", "off")
FID_CHOICES = ("auto", "inception", "tiny", "off")


@dataclass
class EvaluationConfig:
    every: int = 0  # steps between evaluations (raw and EMA weights, logged as eval/* and eval_ema/*); 0 = off
    num_images: int = 256  # size of the fixed subset, the first images of the validation stream
    batch_size: int = 16  # images per forward pass
    lpips: str = "alex"  # alex (the protocol; needs the AlexNet trunk offline) | vgg | random (tests) | off
    lpips_weights: str | None = None  # path of the trunk file; null = $TORCH_HOME/hub/checkpoints
    fid: str = "auto"  # auto (rFID when the Inception weights are present) | inception | tiny (tests) | off
    inception_weights: str | None = None  # path of the FID Inception file; null = $TORCH_HOME/hub/checkpoints
    # DC-AE 1.5: also evaluate these latent channel prefixes (logged as eval/c<N>/*); [] = the full latent only
    latent_channels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_at_least(self, ("every",), 0)
        check_at_least(self, ("num_images", "batch_size"), 1)
        check_choice("lpips", self.lpips, LPIPS_CHOICES)
        check_choice("fid", self.fid, FID_CHOICES)
        c = list(self.latent_channels)
        require(
            all(v >= 1 for v in c) and c == sorted(set(c)), "latent_channels", c, "must be ascending, >= 1", [16, 32]
        )
