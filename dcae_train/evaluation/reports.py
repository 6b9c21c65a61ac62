"""Evaluation outputs: a JSON file (everything), a Markdown table (the headline numbers), a worst-cases grid."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dcae_train.data.shards import write_atomic

# Published rows to compare against (docs/evaluation.md, "Published numbers"); same protocol, full datasets.
PUBLISHED = [
    ("dc-ae-f64c128-in-1.0", "ImageNet val, 512", "50,000", 0.2168, 26.149, 0.7105, 0.0802),
    ("dc-ae-f32c32-sana-1.0", "MJHQ, 1024", "30,000", 0.339, 29.31, None, None),
    ("dc-ae-f32c32-sana-1.1", "MJHQ, 1024", "30,000", 0.314, 29.74, None, None),
]


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(result, indent=2, sort_keys=False, default=_plain) + "\n").encode())


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")


def _fmt(v: float | None, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def markdown_table(result: dict[str, Any], with_published: bool = True) -> str:
    """One row for this run (+ the published rows for reference), columns as in the DC-AE papers."""
    m, lat = result["metrics"], result.get("latent") or {}
    head = "| Model | Data, resolution | Images | rFID | PSNR | SSIM | LPIPS | latent RMS | 1/RMS |\n"
    head += "|---|---|---|---|---|---|---|---|---|\n"
    data = f"{result['data']}, {result['resolution']}"
    row = (
        f"| {result['model']} | {data} | {m['num_images']} | {_fmt(m['rfid'], 4)} | {_fmt(m['psnr'], 3)} | "
        f"{_fmt(m['ssim'], 4)} | {_fmt(m['lpips'], 4)} | {_fmt(lat.get('rms'), 4)} | "
        f"{_fmt(lat.get('scaling_factor'), 4)} |\n"
    )
    out = head + row
    if with_published:
        for name, d, count, fid, psnr, ssim, lp in PUBLISHED:
            out += f"| {name} (published) | {d} | {count} | {fid} | {psnr} | {_fmt(ssim, 4)} | {_fmt(lp, 4)} | | |\n"
    notes = [
        f"rFID features: {result['fid_features']}." if m["rfid"] is not None else "rFID not computed.",
        f"Throughput: {result['throughput']['images_per_s']:.2f} images/s on {result['device']}.",
    ]
    if m["rfid"] is not None and m["num_images"] < 10_000:
        notes.append(f"rFID on {m['num_images']} images is biased upwards (< 10k); compare only equal-size runs.")
    return out + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def prefix_table(result: dict[str, Any]) -> str:
    """DC-AE 1.5: one row per evaluated latent prefix (empty without prefixes)."""
    if not result.get("prefixes"):
        return ""
    out = "\n| latent channels | rFID | PSNR | SSIM | LPIPS | latent RMS | 1/RMS |\n|---|---|---|---|---|---|---|\n"
    for p in result["prefixes"]:
        lat = p.get("latent") or {}
        out += (
            f"| {p['latent_channels']} | {_fmt(p['rfid'], 4)} | {_fmt(p['psnr'], 3)} | {_fmt(p['ssim'], 4)} | "
            f"{_fmt(p['lpips'], 4)} | {_fmt(lat.get('rms'), 4)} | {_fmt(lat.get('scaling_factor'), 4)} |\n"
        )
    return out


def save_prefix_plot(result: dict[str, Any], path: Path) -> None:
    """PNG of each metric against the number of latent channels (DC-AE 1.5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["prefixes"]
    channels = [r["latent_channels"] for r in rows]
    names = [k for k in ("psnr", "ssim", "lpips", "rfid") if all(r[k] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ax.plot(channels, [r[name] for r in rows], marker="o")
        ax.set_xlabel("latent channels")
        ax.set_title(name)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def worst_grid(worst: list[dict[str, Any]]) -> torch.Tensor:
    """Rows of input | reconstruction | |error| x 4, worst PSNR first -> (3, k*H, 3*W) uint8."""
    rows = []
    for w in worst:
        x, x_hat = w["x"].float(), w["x_hat"].float()
        err = ((x - x_hat).abs().mean(0, keepdim=True) * 4).clamp(0, 255).expand_as(x)
        rows.append(torch.cat([x, x_hat, err], dim=2))  # (3, H, 3W)
    return torch.cat(rows, dim=1).to(torch.uint8)


def save_worst_grid(worst: list[dict[str, Any]], path: Path) -> None:
    """PNG of `worst_grid`, each row labelled with its key and PSNR."""
    if not worst:
        return
    grid = worst_grid(worst)
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(img)
    h = worst[0]["x"].shape[1]
    for i, w in enumerate(worst):
        draw.text((3, i * h + 2), f"{w['key']}  {w['psnr']:.2f} dB", fill=(255, 255, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
