"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training"): random, differentiable
colour, translation and cutout transforms applied to every image the discriminator sees, real and fake, in both the
discriminator's and the generator's step, so D cannot memorise the real set and G still gets gradients through them.
Written from the paper; images in [-1, 1], one draw per image.

    colour       brightness + U(-0.5, 0.5); saturation x U(0, 2) around the pixel's channel mean;
                 contrast x U(0.5, 1.5) around the image mean (the paper's three colour ops, in that order)
    translation  integer shift by up to `translation` x the side in each axis, zeros shifted in
    cutout       one square of `cutout` x the side set to zero at a random position (it may cross the border)

`sample` draws the parameters of one call; `apply` uses them, so a pair of batches (a real image and its
reconstruction) can get the same transform (`paired=true`), and every call draws anew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcae_train.losses.config import DiffAugConfig

Params = dict[str, torch.Tensor]


class DiffAugment:
    def __init__(self, config: DiffAugConfig) -> None:
        self.config = config

    def sample(self, x: torch.Tensor) -> Params:
        """One random draw for the batch `x` (B, C, H, W): each image gets its own parameters."""
        b, _, h, w = x.shape
        cfg, dev = self.config, x.device
        p: Params = {}
        if "color" in cfg.policy:
            p["brightness"], p["saturation"], p["contrast"] = (torch.rand(b, 1, 1, 1, device=dev) for _ in range(3))
        if "translation" in cfg.policy:
            sh, sw = _max_shift(x, cfg.translation)
            p["shift_y"] = torch.randint(-sh, sh + 1, (b,), device=dev)
            p["shift_x"] = torch.randint(-sw, sw + 1, (b,), device=dev)
        if "cutout" in cfg.policy:
            ch, cw = int(h * cfg.cutout + 0.5), int(w * cfg.cutout + 0.5)
            p["cut_y"] = torch.randint(0, h + (1 - ch % 2), (b,), device=dev)  # the square's centre
            p["cut_x"] = torch.randint(0, w + (1 - cw % 2), (b,), device=dev)
        return p

    def apply(self, x: torch.Tensor, p: Params) -> torch.Tensor:
        if "brightness" in p:
            x = x + (p["brightness"].to(x.dtype) - 0.5)
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (p["saturation"].to(x.dtype) * 2) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (p["contrast"].to(x.dtype) + 0.5) + mean
        if "shift_y" in p:
            x = translate(x, p["shift_y"], p["shift_x"], pad=max(_max_shift(x, self.config.translation)))
        if "cut_y" in p:
            x = x * cutout_mask(x, p["cut_y"], p["cut_x"], self.config.cutout)
        return x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.apply(x, self.sample(x))

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same transform for a[i] and b[i] (e.g. an image and its reconstruction)."""
        p = self.sample(a)
        return self.apply(a, p), self.apply(b, p)


def _max_shift(x: torch.Tensor, translation: float) -> tuple[int, int]:
    """The largest shift `sample` draws for images of x's size, in rows and columns."""
    h, w = x.shape[-2:]
    return int(h * translation + 0.5), int(w * translation + 0.5)


def translate(x: torch.Tensor, shift_y: torch.Tensor, shift_x: torch.Tensor, pad: int | None = None) -> torch.Tensor:
    """out[b, :, i, j] = x[b, :, i - shift_y[b], j - shift_x[b]], zero outside the image (differentiable gather).

    `pad`: a bound on every |shift| (the zeros padded around the image; the result does not depend on it). Given,
    nothing is read back from the device (`DiffAugment` passes the largest shift it can draw, which also lets the
    cost command run it on fake tensors); None: the largest shift of this draw, read on the host."""
    b, _, h, w = x.shape
    if pad is None:
        pad = int(max(shift_y.abs().max(), shift_x.abs().max()))
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H + 2p, W + 2p)
    rows = torch.arange(h, device=x.device)[None, :] - shift_y[:, None] + pad  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - shift_x[:, None] + pad  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (B, C, H, W)


def cutout_mask(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, 1, H, W) mask, 0 inside each image's square of ratio x the side centred at (cy, cx), 1 elsewhere."""
    _, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ys = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - ch // 2)  # (B, H): row offset into the square
    xs = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - cw // 2)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]  # (B, H, W)
    return (~inside).unsqueeze(1).to(x.dtype)
