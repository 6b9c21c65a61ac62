"""Test helpers: synthetic run folders and checkpoints (what resume discovery reads, nothing more)."""

from __future__ import annotations

from pathlib import Path

import torch

from dcae_train.training import checkpoint as ckpt_lib
from dcae_train.weights.checkpoint import CheckpointMeta


def fake_checkpoint(path: Path, step: int, **meta: object) -> Path:
    """A minimal dcae-train training checkpoint: what resume discovery reads (step and metadata)."""
    fields = {"config": {}, "variant": "tiny", "scaling_factor": 1.0, "phase": 1, "recipe": "quickstart",
              "parent": None, "lpips_pretrained": False, "step": step, **meta}  # fmt: skip
    payload = {"global_step": step, "state_dict": {"w": torch.ones(3)}, "dcae": CheckpointMeta(**fields).to_dict()}
    ckpt_lib.atomic_torch_save(payload, path)
    return path
