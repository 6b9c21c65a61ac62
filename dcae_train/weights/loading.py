"""`load_model(source)`: one entry point for every place DC-AE weights come from.

`source` may be
- a variant name (`"tiny"`, `"dc-ae-f32c32-sana-1.1"`, ...): that architecture with random weights;
- a diffusers folder: `config.json` + `diffusion_pytorch_model[.variant].safetensors` or a sharded index;
- an original efficientvit/DC-Gen `model.safetensors` (or its folder), with an optional sibling `config.json`
  `{"model_name": ...}`; without it the variant is inferred from the tensor shapes;
- one of our Lightning training checkpoints (`.ckpt`): the EMA weights when present and `ema=True`;
- a Hugging Face repo id (`mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers`): fetched with `huggingface_hub`
  (safetensors and JSON only); a cached copy is used offline.
A source that looks like a path (`looks_like_path`: starts with ./ ../ / or ~, ends with .ckpt/.safetensors/.pt/
.pth/.bin, or has more than one /) and does not exist fails with "no such file or folder", never a Hub lookup.

The model is built on the meta device and its tensors are assigned only after every key and shape has been
checked, so a bad file fails before anything is loaded, and a 1 GB model costs no random initialisation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from dcae_train.models import DCAE, DCAEConfig, build_model
from dcae_train.models.variants import VARIANTS, variant_config, variant_name
from dcae_train.weights.checkpoint import read_training_checkpoint
from dcae_train.weights.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    WeightsError,
    find_diffusers_weights,
    read_diffusers_state_dict,
    read_json,
    read_safetensors,
)
from dcae_train.weights.original import ConversionError, looks_original, original_to_diffusers

log = logging.getLogger(__name__)
ORIGINAL_NAME = "model.safetensors"
META_CONFIG = "dcae_config"  # safetensors metadata / config.json key where we store our full config


def load_model(source: str | Path, *, ema: bool = True, variant: str | None = None) -> DCAE:
    """A `DCAE` with weights from `source` (see the module docstring), in fp32, in eval mode.

    `variant` names the released variant of an original checkpoint when the file cannot tell (in vs mix have
    identical tensors and differ only in `scaling_factor`). `model.variant` is the registered name or None.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, variant)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _load_safetensors_file(path, variant)
        if path.suffix == ".bin":
            raise WeightsError(f"{path}: pickle weight files are refused; use the safetensors version")
        return _load_training_checkpoint(path, ema)
    check_local_source(source)
    name = str(source)
    if name in VARIANTS or f"dc-ae-{name}" in VARIANTS:
        return build_model(name).eval()  # random init
    if _looks_like_repo_id(name):
        return _load_folder(_hub_snapshot(name), variant)
    raise WeightsError(
        f"load_model({name!r}): not an existing file or folder, a variant name ({', '.join(VARIANTS)}) "
        f"or a Hugging Face repo id like 'mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers'"
    )


def non_finite_tensors(model: torch.nn.Module) -> list[str]:
    """Names of the floating-point parameters and buffers holding NaN or Inf, each with its count."""
    bad = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            bad.append(f"{name} ({n} of {t.numel()} values)")
    return bad


# Sources -----------------------------------------------------------------------------------------------
def _load_folder(folder: Path, variant: str | None) -> DCAE:
    config_path = folder / CONFIG_NAME
    config_json = read_json(config_path) if config_path.is_file() else {}
    if (folder / ORIGINAL_NAME).is_file() and "_class_name" not in config_json:
        return _load_safetensors_file(folder / ORIGINAL_NAME, variant)
    if not config_json:
        raise WeightsError(
            f"{folder}: neither a diffusers folder ({CONFIG_NAME} + {WEIGHTS_NAME}.safetensors) nor an original "
            f"DC-AE folder ({ORIGINAL_NAME}); nothing to load"
        )
    try:
        config = DCAEConfig.from_diffusers_config(config_json)
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{config_path}: not a supported AutoencoderDC config: {err}") from err
    files = find_diffusers_weights(folder)
    sd = read_diffusers_state_dict(files)
    return _assemble(config, sd, where=str(files[0] if len(files) == 1 else folder), variant=_match_variant(config))


def _load_safetensors_file(path: Path, variant: str | None) -> DCAE:
    sd, meta = read_safetensors(path)
    if not looks_original(sd):
        # A lone diffusers weight file: its config must sit next to it.
        if (path.parent / CONFIG_NAME).is_file() and path.name.startswith(WEIGHTS_NAME):
            return _load_folder(path.parent, variant)
        raise WeightsError(
            f"{path}: holds diffusers-layout keys but has no {CONFIG_NAME} beside it; load the whole diffusers folder"
        )
    config, name = _original_config(path, sd, meta, variant)
    try:
        converted = original_to_diffusers(sd, config)
    except ConversionError as err:
        raise WeightsError(f"{path}: {err}") from err
    return _assemble(config, converted, where=str(path), variant=name)


def _load_training_checkpoint(path: Path, ema: bool) -> DCAE:
    ckpt, meta = read_training_checkpoint(path)
    try:
        config = meta.model_config()
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{path}: ckpt['dcae']['config'] is invalid: {err}") from err
    state = ckpt["state_dict"]
    prefix = "ema." if ema and any(k.startswith("ema.") for k in state) else "model."
    if ema and prefix == "model.":
        log.info("%s has no EMA weights; loading the raw weights", path)
    sd = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not sd:
        raise WeightsError(f"{path}: state_dict has no 'model.*' autoencoder weights")
    return _assemble(config, sd, where=f"{path} ({prefix}*)", variant=meta.variant)


def _hub_snapshot(repo_id: str) -> Path:
    try:
        # safetensors + JSON only: pickled .bin files are never fetched. Falls back to the cache when offline.
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except RepositoryNotFoundError as err:
        raise WeightsError(f"{repo_id}: no such Hugging Face repo (or it is gated/private; log in first)") from err
    except LocalEntryNotFoundError as err:
        raise WeightsError(
            f"{repo_id}: the Hugging Face Hub cannot be reached (no network or HF_HUB_OFFLINE=1) and there is no "
            f"cached copy. Download it once with network access (`huggingface-cli download {repo_id}`) or pass "
            f"a local folder."
        ) from err


# Checks, then assignment ---------------------------------------------------------------------------------
def _assemble(config: DCAEConfig, sd: Mapping[str, torch.Tensor], *, where: str, variant: str | None) -> DCAE:
    """Build `DCAE(config)` without initialising it, check keys and shapes, then assign the tensors (fp32, eval)."""
    with torch.device("meta"):
        model = DCAE(config, variant)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    problems = [
        (missing, "missing"),
        (unexpected, "unexpected"),
        (wrong, "with the wrong shape"),
    ]
    for keys, what in problems:
        if keys:
            raise WeightsError(
                f"{where}: {len(keys)} key(s) {what} for this architecture, e.g. {keys[:3]}. The weights do not "
                f"match the config: check the variant / config.json, or the file is incomplete."
            )
    cast = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


# Variant inference for original checkpoints ---------------------------------------------------------------
def _original_config(path: Path, sd: dict[str, torch.Tensor], meta: dict[str, str], variant: str | None):
    """(config, variant name) of an original checkpoint: argument, our metadata, sibling config.json, shapes."""
    if variant:
        return _named_config(variant, sd)
    if META_CONFIG in meta:
        d = json.loads(meta[META_CONFIG])
        return DCAEConfig.from_dict(d["config"]), d.get("variant")
    sibling = path.parent / CONFIG_NAME
    if sibling.is_file():
        data = read_json(sibling)
        if META_CONFIG in data:
            return DCAEConfig.from_dict(data[META_CONFIG]), data.get("model_name")
        name = data.get("model_name")
        try:
            return _named_config(name, sd)
        except ValueError:  # e.g. a newer release: the shapes may still identify the architecture
            if name is not None:
                log.warning("%s: model_name=%r is not a known variant; inferring it from the shapes", sibling, name)
    return _infer_original_config(path, sd)


def _named_config(name: str, sd: Mapping[str, torch.Tensor]) -> tuple[DCAEConfig, str | None]:
    """A registered variant (or one of DC-Gen's names for it) at the width of the file; named only at full width
    (a reduced-width file, e.g. a test model of the family, is that architecture scaled, not the release)."""
    canonical = variant_name(name)
    full = variant_config(canonical)
    config = _rescaled_to(full, sd) or full
    return config, canonical if config == full else None


def _infer_original_config(path: Path, sd: Mapping[str, torch.Tensor]) -> tuple[DCAEConfig, str | None]:
    """Every registered variant (also at reduced width) whose keys and shapes match; in vs mix stays ambiguous."""
    matches: list[tuple[str, DCAEConfig]] = []
    for name in VARIANTS:
        config = _rescaled_to(variant_config(name), sd)
        if config is not None and _shapes_match(config, sd):
            matches.append((name, config))
    if not matches:
        raise WeightsError(
            f"{path}: the tensors match no known DC-AE architecture ({', '.join(VARIANTS)}); put a config.json "
            f'{{"model_name": ...}} beside it or export it with dcae_train (which records the config)'
        )
    factors = {c.scaling_factor for _, c in matches}
    if len(factors) > 1:
        names = [n for n, _ in matches]
        raise WeightsError(
            f"{path}: the architecture fits {names}, which differ only in scaling_factor; say which with a sibling "
            f'config.json {{"model_name": "{names[0]}"}} or load_model(..., variant="{names[0]}")'
        )
    name, config = matches[-1]  # sana-1.0 and 1.1 are identical in architecture and factor: report the newer
    full_width = config.encoder_block_out_channels == variant_config(name).encoder_block_out_channels
    return config, name if full_width else None


def _rescaled_to(config: DCAEConfig, sd: Mapping[str, torch.Tensor]) -> DCAEConfig | None:
    """`config` at the width of the file (e.g. a quarter-width test model), judged by the latent conv."""
    w = next((v for k, v in sd.items() if k.startswith("encoder.project_out.") and k.endswith("weight")), None)
    if w is None or w.ndim != 4:
        return None
    ratio, latent = w.shape[1] / config.encoder_block_out_channels[-1], w.shape[0]
    # The latent width follows the file too (reduced-width families may scale it to keep the shortcut groups).
    scale_latent = latent != config.latent_channels and latent == round(config.latent_channels * ratio)
    try:
        scaled = config if ratio == 1 else config.scaled(ratio, scale_latent=scale_latent)
        return scaled if latent == scaled.latent_channels else scaled.replace(latent_channels=latent)
    except ValueError:
        return None


def _shapes_match(config: DCAEConfig, sd: Mapping[str, torch.Tensor]) -> bool:
    try:
        converted = original_to_diffusers(sd, config)
    except ConversionError:
        return False
    with torch.device("meta"):
        expected = DCAE(config).state_dict()
    return set(converted) == set(expected) and all(converted[k].shape == v.shape for k, v in expected.items())


def _match_variant(config: DCAEConfig) -> str | None:
    """The registered name of an architecture + factor (the last of equal ones, e.g. sana-1.1 over 1.0)."""
    names = [n for n in VARIANTS if variant_config(n) == config]
    return names[-1] if names else None


WEIGHT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth", ".bin")


def check_local_source(source: str | Path) -> None:
    """A source meant as a local path (`looks_like_path`) must exist: a typo in a local path says so, and is never
    sent to the Hub. Tools that take a source without loading it (the cost estimate) check it with this."""
    path = Path(source).expanduser()
    if not path.exists() and looks_like_path(str(source)):
        raise WeightsError(f"no such file or folder: {path} (check the path; relative paths start from {Path.cwd()})")


def looks_like_path(name: str) -> bool:
    """A source meant as a local path, never a Hub repo id or a variant name [ours]: it starts with `./`, `../`, `/`
    or `~`, ends with a weight-file suffix, or has more than one `/` (a repo id has exactly one)."""
    return name.startswith(("./", "../", "/", "~")) or name.endswith(WEIGHT_SUFFIXES) or name.count("/") > 1


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
