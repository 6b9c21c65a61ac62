"""Convert DC-AE weights between formats.

    python -m dcae_train.export SOURCE OUT_DIR [--format diffusers|original] [--dtype fp32|bf16]

SOURCE is anything `dcae_train.load_model` takes: a variant name, a diffusers folder, an original
`model.safetensors` (or its folder), one of our `.ckpt` training checkpoints, or a Hugging Face repo id.
`--format diffusers` (default) writes a folder for `diffusers.AutoencoderDC.from_pretrained(OUT_DIR)`
(`variant="bf16"` for `--dtype bf16`); `--format original` writes `OUT_DIR/model.safetensors` + `config.json`
in the efficientvit/DC-Gen layout. `--with-discriminator` (SOURCE: a phase-3 `.ckpt`) also writes
`discriminator.safetensors` + `discriminator.json` into OUT_DIR, for a phase-3 run of someone else to continue
from (`init_discriminator=OUT_DIR`); the autoencoder files never contain it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dcae_train.data.shards import check_output_file, check_output_folder
from dcae_train.weights import WeightsError, export_diffusers, export_original, load_model
from dcae_train.weights.discriminator import export_discriminator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dcae_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="variant name, diffusers folder, original .safetensors, our .ckpt, or HF repo id")
    p.add_argument("out_dir", help="output folder")
    p.add_argument("--format", choices=("diffusers", "original"), default="diffusers")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--scaling-factor", type=float, default=None, help="override the latent scaling factor")
    p.add_argument("--variant", default=None, help="released variant of an original checkpoint (e.g. in vs mix)")
    p.add_argument("--raw", action="store_true", help="from our checkpoints: the raw weights instead of the EMA")
    p.add_argument(
        "--with-discriminator", action="store_true", help="from a phase-3 .ckpt: also write its discriminator"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_out(args)
        model = load_model(args.source, ema=not args.raw, variant=args.variant)
        if args.format == "diffusers":
            out = export_diffusers(model, args.out_dir, dtype=args.dtype, scaling_factor=args.scaling_factor)
        else:
            if args.scaling_factor is not None:
                model.config = model.config.replace(scaling_factor=args.scaling_factor)
            out = export_original(model, args.out_dir, dtype=args.dtype)
        disc = _export_discriminator(args) if args.with_discriminator else None
    except (WeightsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n = sum(p.numel() for p in model.parameters())
    sf = model.config.scaling_factor if args.scaling_factor is None else args.scaling_factor
    name = model.variant or "custom"
    print(
        f"wrote {args.format} {args.dtype} weights of {name} ({n / 1e6:.1f}M parameters, scaling_factor={sf}) to {out}"
    )
    if disc is not None:
        print(f"wrote the discriminator to {disc} (continue phase 3 from it with init_discriminator={disc.parent})")
    return 0


def check_out(args: argparse.Namespace) -> None:
    """Before the weights load (maybe a download): out_dir must be a folder we can write, or, for the original
    layout, a `.safetensors` file path in one."""
    out = Path(args.out_dir)
    if args.format == "original" and out.suffix == ".safetensors":
        if out.is_dir():
            raise ValueError(f"out_dir {out}: is a folder; give a file path ending in .safetensors, or a folder name")
        check_output_file(out, "out_dir")
    else:
        check_output_folder(out, "out_dir")


def _export_discriminator(args: argparse.Namespace) -> Path:
    if not str(args.source).endswith(".ckpt"):
        raise ValueError(f"--with-discriminator needs a phase-3 training checkpoint (.ckpt), got {args.source}")
    out = Path(args.out_dir)
    return export_discriminator(args.source, out.parent if out.suffix == ".safetensors" else out)


if __name__ == "__main__":
    sys.exit(main())
