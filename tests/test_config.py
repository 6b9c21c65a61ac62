"""The typed config tree: every key typed, defaulted and documented; typos answered with the closest key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dcae_train import cli
from dcae_train.config import TrainConfig, all_keys, compose, help_text, recipe_names, to_config
from dcae_train.schema import ConfigError, UnknownKeyError, build, field_docs, suggest

ROOT = Path(__file__).resolve().parent.parent


# Every key: a type, a default, a line of meaning ----------------------------------------------------------
def test_every_key_has_a_type_a_default_and_a_docs_line():
    keys = all_keys()
    assert len(keys) > 100
    for k in keys:
        assert k.type and k.type != "Any", k.key
        assert k.default != "???" or k.key == "data.train", k.key  # only the shards have no default
        assert len(k.doc) >= 10, f"{k.key} has no docs line (a comment on its line in the dataclass)"


def test_the_schema_is_typed_all_the_way_down():
    """No untyped dict nodes left: every non-leaf is a dataclass (model, data, loss, disc, ... included)."""
    for k in all_keys():
        assert not k.type.startswith("dict"), k.key
    names = {k.key for k in all_keys()}
    for key in ("model.variant", "data.num_workers", "phases.p3.loss.disc.width", "phases.p2.optimizer.lr",
                "evaluation.fid", "perceptual.allow_download", "logger.wandb.mode", "trainer.precision"):  # fmt: skip
        assert key in names, key


def test_defaults_are_stated_once(tmp_path):
    """The YAML of conf/ only overrides: no file restates a schema default under the same key."""
    import yaml

    defaults = {k.key: k.default for k in all_keys()}
    restated = []
    for path in (ROOT / "conf").rglob("*.yaml"):
        if path.parts[-2] == "debug":
            continue  # smoke.yaml pins a few values on purpose, whatever the recipe set
        node = yaml.safe_load(path.read_text()) or {}
        group = path.parent.name if path.parent.name != "conf" else ""
        for key, value in _flat(node, group).items():
            if key in defaults and defaults[key] == value:
                restated.append(f"{path.relative_to(ROOT)}: {key}={value!r}")
    assert not restated, restated


def _flat(node: dict, prefix: str) -> dict:
    out = {}
    for k, v in node.items():
        if k == "defaults":
            continue
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_help_config_prints_every_key(capsys):
    assert cli.main(["--help-config"]) == 0
    out = capsys.readouterr().out
    for k in all_keys():
        assert f"\n{k.key}: {k.type} = " in "\n" + out, k.key


def test_docs_config_page_is_current():
    page = ROOT / "docs" / "config.md"
    assert page.read_text() == help_text(markdown=True), (
        "docs/config.md is stale: python -m dcae_train --help-config --markdown > docs/config.md"
    )


def test_field_docs_read_the_comment_on_the_line_or_above():
    @dataclasses.dataclass
    class Example:
        a: int = 1  # the a
        # the b, on two
        # lines above
        b: int = 2
        c: int = 3

    assert field_docs(Example) == {"a": "the a", "b": "the b, on two lines above", "c": ""}


# Typos ---------------------------------------------------------------------------------------------------
MISSPELLINGS = [  # (override, the key named, the suggestion)
    ("phases.p1.lr=1", "phases.p1.lr", "phases.p1.optimizer.lr"),
    ("phases.p1.loss.lpipz=1", "phases.p1.loss.lpipz", "phases.p1.loss.lpips"),
    ("data.num_workerz=1", "data.num_workerz", "data.num_workers"),
    ("phases.p1.optimiser.lr=1", "phases.p1.optimiser", "phases.p1.optimizer"),  # a misspelt node
]


@pytest.mark.parametrize(("override", "key", "suggestion"), MISSPELLINGS)
def test_misspelt_key_exits_2_with_the_closest_key(tmp_path, capsys, override, key, suggestion):
    code = cli.main([f"runs_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == cli.EXIT_CONFIG, err
    assert f"{key}: not a config key; did you mean {suggestion}" in err, err
    assert "+" not in err, "never suggest appending with +key="
    assert not (tmp_path / "quickstart").exists(), "nothing ran"


def test_appended_typo_is_refused_too():
    with pytest.raises(UnknownKeyError, match="did you mean phases.p1.optimizer.lr"):
        to_config(compose(["+phases.p1.lr=1"]))


def test_typo_in_a_recipe_file_names_the_key(tmp_path, monkeypatch):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    for p in (ROOT / "recipes").glob("*.yaml"):
        (recipes / p.name).write_text(p.read_text())
    name = "typo"
    (recipes / f"{name}.yaml").write_text("# @package _global_\nrecipe: typo\nphases:\n  p2:\n    loss: {lpipz: 0.5}\n")
    monkeypatch.setattr("dcae_train.config.recipes_dir", lambda: recipes)
    assert "typo" in recipe_names()
    with pytest.raises(
        UnknownKeyError, match="phases.p2.loss.lpipz: not a config key; did you mean phases.p2.loss.lpips"
    ):
        compose(["recipe=typo"])


def test_wrong_type_names_the_expected_type():
    with pytest.raises(ValueError, match=r"phases.p1.batch_size=abc: expected int \(e.g. phases.p1.batch_size=32\)"):
        compose(["phases.p1.batch_size=abc"])
    with pytest.raises(ValueError, match=r"trainer.deterministic=maybe: expected bool"):
        compose(["trainer.deterministic=maybe"])


def test_suggest_prefers_the_same_parents():
    keys = [k.key for k in all_keys()]
    assert suggest("phases.p2.lr", keys)[0] == "phases.p2.optimizer.lr"
    assert suggest("data.crop_scal", keys) == ["data.crop_scale"]
    assert suggest("completely.unrelated.zzzz", keys) == []


# Rules: checked once, in the dataclass, with the full key ----------------------------------------------------
def test_rules_name_the_full_key_and_an_example():
    with pytest.raises(ConfigError) as err:
        to_config(compose(["phases.p2.optimizer.betas=[0.9,1.5]"]))
    assert str(err.value) == "phases.p2.optimizer.betas=[0.9, 1.5]: must be two numbers in [0, 1); e.g. " \
        "phases.p2.optimizer.betas=[0.9, 0.999]"  # fmt: skip
    with pytest.raises(ConfigError, match=r"phases.p1.resolution=100: must be a multiple of 8 .*nearest: 96, 104"):
        to_config(compose(["phases.p1.resolution=100"]))
    with pytest.raises(ConfigError, match="phases.p3.loss.gan=0.0: phase 3"):
        to_config(compose(["phase=3", "phases.p3.loss.gan=0"]))
    with pytest.raises(ConfigError, match="resume='auto': continues a run"):
        to_config(compose(["resume=auto", "init_from=tiny"]))


def test_build_refuses_unknown_keys_from_python_too():
    with pytest.raises(
        UnknownKeyError, match="phases.p1.ema.decai: not a config key; did you mean phases.p1.ema.decay"
    ):
        build(TrainConfig, {"data": {"train": "demo"}, "phases": {"p1": {"ema": {"decai": 0.5}}}})


def test_model_group_is_gone_and_model_shorthand_sets_the_variant():
    assert not (ROOT / "conf" / "model").exists()
    assert compose(["model=tiny-in"]).model.variant == "tiny-in"
