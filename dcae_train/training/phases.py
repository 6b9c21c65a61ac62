"""Which parameters train in a phase, chosen by parameter-name globs, and freezing the rest for real.

Frozen means: `requires_grad=False`, not in any optimizer, and every BatchNorm whose affine parameters are
frozen stays in eval mode (its running statistics do not move), even when Lightning calls `.train()`.
The module names are the diffusers `AutoencoderDC` keys (see `dcae_train.models`):

| phase | default selection | what it is |
|---|---|---|
| 1 | `*` | everything |
| 2 | `encoder.conv_out.*`, `decoder.conv_in.*` | the layers around the latent ("middle layers") |
| 3 | `decoder.norm_out.*`, `decoder.conv_out.*` | the decoder head |
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn


def select_trainable(model: nn.Module, patterns: Sequence[str], *, key: str = "trainable") -> list[str]:
    """Names of the parameters matched by any glob; a glob that matches nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    selected: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            prefixes = sorted({".".join(n.split(".")[:2]) for n in names})
            raise ValueError(
                f"{key}: pattern {pattern!r} matches no parameter of the model. "
                f"Parameter names look like {names[0]!r}; top-level modules: {', '.join(prefixes[:12])}"
            )
        selected.update(hits)
    return [n for n in names if n in selected]


def freeze_all_but(model: nn.Module, trainable: Sequence[str]) -> None:
    """Set requires_grad from the selection and put frozen BatchNorms in eval."""
    keep = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    set_frozen_norms_eval(model)


def set_frozen_norms_eval(model: nn.Module) -> None:
    """A BatchNorm with frozen affine parameters must not update its running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not _has_trainable_params(module):
            module.eval()


def _has_trainable_params(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))
