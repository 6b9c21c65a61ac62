"""The run's config: one typed tree composed by Hydra, and the one boundary where YAML becomes dataclasses.

    cfg = compose(["recipe=dc-ae-f32c32-sana-1.1", "phase=2"])   # Hydra types every key while composing
    run_cfg = to_config(cfg)                                       # -> TrainConfig; every rule checked once

`TrainConfig` composes the configs each part owns (model, data, losses, evaluation, trainer parts); Hydra
starts from it (`train_schema` in `conf/train.yaml`), so a misspelt key in a recipe, a YAML file or on the
command line fails while composing. `compose` turns Hydra's and OmegaConf's errors into one line that names
the key and the closest valid keys (never Hydra's `+key=` advice, which would silently add a typo).
`python -m dcae_train --help-config` and docs/config.md list every key (`help_text`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dcae_train.data.config import DataConfig
from dcae_train.evaluation.config import EvaluationConfig
from dcae_train.losses.config import FoundationConfig, PerceptualConfig
from dcae_train.models.options import ModelConfig
from dcae_train.models.variants import variant_config
from dcae_train.schema import ConfigError, KeyInfo, UnknownKeyError, build, config_keys, key_paths, require
from dcae_train.training.config import LoggerConfig, PhaseConfig, Phases, TrainerConfig

PACKAGE_ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    """Everything one training run needs; `python -m dcae_train --help-config` lists every key."""

    recipe: str = "quickstart"  # the recipe's name: runs go to <runs_dir>/<recipe>/phase<N>/<time>
    phase: int = 1  # 1 | 2 | 3: which of the recipe's phases.p<N> runs
    seed: int = 0  # seeds weights, data order and augmentation
    init_from: str | None = None  # weights: checkpoint | diffusers dir (+ exported D) | original file | HF id | auto
    init_discriminator: str | None = None  # phase 3: start D from an exported discriminator (folder/.safetensors/.ckpt)
    init_ema: bool = True  # take the EMA weights of a parent checkpoint when it has them
    resume: str | None = None  # auto | path to a checkpoint of this recipe and phase (full state, same run)
    runs_dir: str = "runs"  # runs go to <runs_dir>/<recipe>/phase<N>/<time>
    run_dir: str | None = None  # explicit run folder (default: <runs_dir>/<recipe>/phase<N>/<time>)
    validate_at_start: bool = True  # one validation pass before the first step (the curves start at step 0)
    model: ModelConfig = field(default_factory=ModelConfig)  # which variant, and how it runs
    data: DataConfig = field(default_factory=DataConfig)  # where the images come from
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # devices, nodes, precision
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # wandb (metrics.csv and PNGs are always written)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)  # where the LPIPS trunk comes from
    foundation: FoundationConfig = field(default_factory=FoundationConfig)  # the DINOv2 of the alignment losses
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)  # protocol metrics during training
    phases: Phases = field(default_factory=Phases)  # the three phases of the recipe

    def __post_init__(self) -> None:
        require(self.phase in (1, 2, 3), "phase", self.phase, "the recipe has phases 1, 2 and 3", 2)
        require(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32) (numpy's seed range)", 0)
        if self.resume and self.init_from:
            raise ConfigError(
                "resume",
                self.resume,
                "continues a run (full state); init_from= starts a new one from weights: give one",
            )
        if self.init_discriminator and (self.resume or self.phase_config.loss.gan <= 0):
            why = "resume= restores the discriminator itself" if self.resume else "this phase has no GAN (loss.gan=0)"
            raise ConfigError("init_discriminator", self.init_discriminator, f"not with {why}")
        self._check_phase()

    def _check_phase(self) -> None:
        """Rules that join the selected phase with the model: its sizes must fit the variant's compression."""
        p, phase, ratio = f"phases.p{self.phase}", self.phase_config, self.model.spatial_compression
        for name, res in (("resolution", phase.resolution), ("val_resolution", phase.val_resolution)):
            if res is not None and res % ratio:
                lo, hi = max(ratio, res // ratio * ratio), (res // ratio + 1) * ratio
                rule = f"must be a multiple of {ratio} for model.variant={self.model.variant} (nearest: {lo}, {hi})"
                raise ConfigError(f"{p}.{name}", res, rule, lo)
        self._check_prefixes(f"{p}.latent_prefixes.channels", phase.latent_prefixes.channels, end=True)
        self._check_prefixes("evaluation.latent_channels", self.evaluation.latent_channels, end=False)
        repa, stages = phase.loss.repa, variant_config(self.model.variant).num_stages
        if repa.enabled and repa.stage >= stages:
            rule = f"model.variant={self.model.variant} has {repa.where} stages 0..{stages - 1}"
            raise ConfigError(f"{p}.loss.repa.stage", repa.stage, rule, stages // 2)
        if self.phase == 3 and phase.loss.gan <= 0:
            raise ConfigError(
                f"{p}.loss.gan", phase.loss.gan, "phase 3 (local refinement) trains with a GAN loss: set it > 0", 0.5
            )

    def _check_prefixes(self, key: str, prefixes: list[int], *, end: bool) -> None:
        """Latent channel prefixes need a variant without a shortcut around the latent, and fit its latent."""
        if not prefixes:
            return
        arch = variant_config(self.model.variant)
        c = arch.latent_channels
        if not arch.takes_latent_prefixes:
            rule = f"model.variant={self.model.variant} has a shortcut around the latent: no channel prefixes"
            raise ConfigError(key, prefixes, f"{rule} (DC-AE 1.5 variants take them)", [])
        if (prefixes[-1] != c) if end else (prefixes[-1] > c):
            where = "end at" if end else "stay within"
            rule = f"must {where} the {c} latent channels of model.variant={self.model.variant}"
            raise ConfigError(key, prefixes, rule, [c // 2, c])

    @property
    def phase_config(self) -> PhaseConfig:
        return getattr(self.phases, f"p{self.phase}")


def register_schema() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


register_schema()


# Where the YAML lives ------------------------------------------------------------------------------------
def config_dir() -> Path:
    """conf/ shipped inside the wheel (dcae_train/conf), else the repository's top-level conf/."""
    inside = PACKAGE_ROOT / "conf"
    return inside if (inside / "train.yaml").is_file() else PACKAGE_ROOT.parent / "conf"


def recipes_dir() -> Path:
    inside = PACKAGE_ROOT / "recipes"
    return inside if inside.is_dir() and any(inside.glob("*.yaml")) else PACKAGE_ROOT.parent / "recipes"


def recipe_names() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if not p.stem.startswith("_"))


# Composing ------------------------------------------------------------------------------------------------
def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The composed config of `conf/train.yaml` + recipe + overrides; ValueError naming the key on any mistake."""
    translated = translate_overrides(overrides)
    search = f"hydra.searchpath=[file://{recipes_dir().parent}]"
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="dcae_train"):
            return hydra_compose("train", overrides=[*translated, search])
    except (HydraException, OmegaConfBaseException) as err:
        raise explain(err, translated) from None


def translate_overrides(overrides: Sequence[str]) -> list[str]:
    """`recipe=NAME` selects the group `recipes`; `model=NAME` sets model.variant; brace patterns are quoted."""
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        if sep and key == "recipe":
            if value not in recipe_names():
                raise ValueError(f"recipe={value!r} is not a recipe; available: {', '.join(recipe_names())}")
            o = f"recipes={value}"
        elif sep and key == "model":
            o = f"model.variant={value}"
        out.append(_quote_brace_pattern(o))
    return out


def _quote_brace_pattern(override: str) -> str:
    """`data.train=shards/train-{000000..000099}.tar` is a WebDataset brace pattern, not Hydra syntax: quote it."""
    key, sep, value = override.partition("=")
    if not sep or not ("{" in value or "}" in value) or value[:1] in "'\"[{" or "'" in value:
        return override
    return f"{key}='{value}'"


def explain(err: BaseException, overrides: Sequence[str] = ()) -> ValueError:
    """One clear ValueError for a Hydra/OmegaConf composition error: unknown key -> the closest valid keys,
    wrong type -> the expected type. Anything else keeps the first line of Hydra's message."""
    cause = _omegaconf_cause(err)
    key = getattr(cause, "full_key", None) if cause is not None else None
    if key and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        return UnknownKeyError(key, key_paths(TrainConfig))
    if key and isinstance(cause, ValidationError):
        return _type_error(key, cause, overrides)
    return ValueError(f"bad configuration: {str(err).splitlines()[0]}")


def _omegaconf_cause(err: BaseException | None) -> OmegaConfBaseException | None:
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _type_error(key: str, cause: BaseException, overrides: Sequence[str]) -> ValueError:
    info = {k.key: k for k in all_keys()}.get(key)
    given = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
    if given is None:
        m = re.search(r"Value '(.*?)' of type", str(cause))
        given = m.group(1) if m else "?"
    if info is None:
        return ValueError(f"{key}={given}: {str(cause).splitlines()[0]}")
    return ValueError(f"{key}={given}: expected {info.type} (e.g. {key}={_yaml(info.default)})")


# The key reference -----------------------------------------------------------------------------------------
def all_keys() -> list[KeyInfo]:
    return config_keys(TrainConfig)


def help_text(markdown: bool = False) -> str:
    """Every key with type, default and meaning: plain text for --help-config, a Markdown table for docs/."""
    keys = all_keys()
    if not markdown:
        lines = [f"{k.key}: {k.type} = {_yaml(k.default)}\n    {k.doc}" for k in keys]
        return "\n".join(lines) + "\n"
    head = [
        "# Configuration keys",
        "",
        "Every key of `python -m dcae_train`, with its type, its default in the schema and what it means. Recipes",
        "(`recipes/*.yaml`) and config groups (`conf/`) override some of them; `python -m dcae_train --cfg` prints",
        "the composed values. Generated from the dataclasses by `python -m dcae_train --help-config --markdown`;",
        "`tests/test_config.py` checks that this page is current. Source tags: see [recipe.md](recipe.md).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    rows = [f"| `{k.key}` | {_md(k.type)} | `{_yaml(k.default)}` | {_md(k.doc)} |" for k in keys]
    return "\n".join(head + rows) + "\n"


def _md(text: str) -> str:
    """Table-cell safe: a `|` would end the cell and `<name>` would be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _yaml(value: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()[3:] if value is not None else "null"


# The typed boundary ----------------------------------------------------------------------------------------
def to_config(cfg: DictConfig | Mapping[str, Any]) -> TrainConfig:
    """Composed config (or a plain mapping) -> TrainConfig, with every rule of every part checked once."""
    if not isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        except OmegaConfBaseException as err:
            raise explain(err) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " data.train='/data/shards/train-{000000..000099}.tar'" if "data.train" in missing else ""
        raise ValueError(f"{missing[0]} is required (???) and not set: give it on the command line, e.g.{example}")
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return build(TrainConfig, data)
