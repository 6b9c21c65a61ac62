"""What every typed config of the package shares: the error type, the key reference and the typed boundary.

Each part of the package owns a dataclass config beside it (`models/options.py`, `data/config.py`,
`losses/config.py`, `evaluation/config.py`, `training/config.py`); `dcae_train/config.py` composes them into
the one schema Hydra types while composing. This module knows nothing about the parts:

- `ConfigError`: a bad value, raised by a dataclass's `__post_init__` with the key relative to that dataclass;
  `build()` prefixes the path of the node, so the user reads the full key (`phases.p1.batch_size=0 ...`).
- `build(cls, data)`: plain containers -> nested dataclasses, every `__post_init__` run once, unknown keys
  refused with the closest valid key (a `+key=` from the command line bypasses Hydra's own check).
- `config_keys(cls)`: every leaf key with its type, default and one line of meaning. The meaning is the comment
  on the field's line (or the comment lines just above it) in the dataclass source: we keep the compact
  one-line-per-key style of the config files, and the reference is generated from it, never written twice.
- `suggest(key, keys)`: did-you-mean for a misspelt or misplaced key.

Torch-free, like every config module: composing and checking a config never imports torch.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

MISSING = "???"  # OmegaConf's marker of a required value


class ConfigError(ValueError):
    """A bad config value: names the key, the value and a valid example.

    `rule` may name sibling keys as `{p}name`: `{p}` becomes the path of the dataclass that raised it.
    """

    def __init__(self, name: str, value: Any, rule: str, example: Any = None, *, node: str = "") -> None:
        self.name, self.value, self.rule, self.example, self.node = name, value, rule, example, node
        super().__init__(str(self))

    @property
    def key(self) -> str:
        return f"{self.node}.{self.name}" if self.node else self.name

    def within(self, prefix: str) -> ConfigError:
        """The same error seen from the parent node `prefix`."""
        node = f"{prefix}.{self.node}" if self.node else prefix
        return ConfigError(self.name, self.value, self.rule, self.example, node=node) if prefix else self

    def __str__(self) -> str:
        rule = self.rule.replace("{p}", f"{self.node}." if self.node else "")
        example = f"; e.g. {self.key}={_show(self.example)}" if self.example is not None else ""
        return f"{self.key}={_show(self.value)}: {rule}{example}"


class UnknownKeyError(ValueError):
    """A key that the schema does not have; the message suggests the closest valid keys."""

    def __init__(self, key: str, valid: list[str], what: str = "config") -> None:
        self.key = key
        hint = suggest(key, valid)
        if hint:
            fix = f"did you mean {' or '.join(hint)}?"
        else:
            fix = "see `python -m dcae_train --help-config`" if what == "config" else f"valid: {', '.join(valid)}"
        super().__init__(f"{key}: not a{'n' * (what[:1] in 'aeiouAEIOU')} {what} key; {fix}")


def reject_unknown(keys: Iterable[str], valid: list[str], what: str = "config") -> None:
    """The one unknown-key check: UnknownKeyError for the first key not in `valid`, with the closest ones."""
    for key in keys:
        if key not in valid:
            raise UnknownKeyError(key, valid, what)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


# Small rule helpers used by the part configs ------------------------------------------------------------
def require(ok: bool, name: str, value: Any, rule: str, example: Any = None) -> None:
    if not ok:
        raise ConfigError(name, value, rule, example)


def check_at_least(obj: Any, names: tuple[str, ...], low: int, example: Any = None) -> None:
    """Each named integer field of `obj` must be >= low."""
    for name in names:
        value = getattr(obj, name)
        require(value >= low, name, value, f"must be >= {low}", example)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    require(value in choices, name, value, f"use one of {', '.join(map(repr, choices))}", choices[0])


def is_missing(value: Any) -> bool:
    return isinstance(value, str) and value == MISSING


# The typed boundary: plain containers -> dataclasses ------------------------------------------------------
def build(cls: type, data: Mapping[str, Any]) -> Any:
    """`cls(**data)` with nested dataclasses built first; errors name the full key."""
    return _build(cls, data, "", cls)


def _build(cls: type, data: Mapping[str, Any], path: str, root: type) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [_join(path, name) for name in data if name not in names]
    if unknown:
        reject_unknown(unknown, key_paths(root))
    kwargs = {}
    for name, value in data.items():
        if is_missing(value):
            raise ValueError(f"{_join(path, name)} is required (???) and not set: give it on the command line")
        target = _dataclass_type(hints[name])
        if target is not None and isinstance(value, Mapping):
            value = _build(target, value, _join(path, name), root)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.within(path) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# The key reference -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInfo:
    key: str  # full dotted key
    type: str  # e.g. "int", "float | None", "list[str]"
    default: Any
    doc: str


def config_keys(cls: type, prefix: str = "", default: Any = None) -> list[KeyInfo]:
    """Every leaf key under `cls` (nested dataclasses expanded) with type, default and meaning."""
    return list(_iter_keys(cls, prefix, default))


def key_paths(cls: type) -> list[str]:
    """Every valid key under `cls`: the leaves and the nodes above them (`phases`, `phases.p1`, ...)."""
    leaves = [k.key for k in config_keys(cls)]
    nodes = {".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 1)}
    return leaves + sorted(nodes)


def _iter_keys(cls: type, prefix: str, default: Any) -> Iterator[KeyInfo]:
    hints, docs = _hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name) if default is not None else _field_default(f)
        key = _join(prefix, f.name)
        target = _dataclass_type(hints[f.name])
        if target is not None:
            yield from _iter_keys(target, key, value)
        else:
            yield KeyInfo(key, type_name(hints[f.name]), value, docs.get(f.name, ""))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return MISSING


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def type_name(tp: Any) -> str:
    """A short readable name of an annotation: int, float | None, list[float], any."""
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class source: the trailing comment of the field's lines, else the
    comment lines directly above it. (Python keeps no docstrings for dataclass fields; reading the comments
    keeps the config files one line per key.)"""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.add(tok.start[0])
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            if not own:
                n, above = node.lineno - 1, []
                while n in comments and n not in code_lines:
                    above.insert(0, comments[n])
                    n -= 1
                own = above
            docs[node.target.id] = " ".join(own)
    return docs


# Did you mean ----------------------------------------------------------------------------------------------
def suggest(key: str, valid: list[str], limit: int = 2) -> list[str]:
    """The valid keys closest to `key`: a close leaf name under the same parents scores highest.

    `phases.p1.lr` -> `phases.p1.optimizer.lr`; `phases.p1.loss.lpipz` -> `phases.p1.loss.lpips`;
    `data.num_workerz` -> `data.num_workers`.
    """
    parts = key.split(".")
    scored = []
    for cand in valid:
        c_parts = cand.split(".")
        leaf = difflib.SequenceMatcher(None, parts[-1], c_parts[-1]).ratio()
        whole = difflib.SequenceMatcher(None, key, cand).ratio()
        parents = _in_order(parts[:-1], c_parts[:-1])
        scored.append((2.0 * leaf + whole + parents, cand, leaf))
    scored.sort(key=lambda s: -s[0])
    best = [(s, c) for s, c, leaf in scored if leaf >= 0.6 or s >= 2.6]
    if not best:
        return []
    top = best[0][0]
    return [c for s, c in best[:limit] if s >= top - 0.15]


def _in_order(wanted: list[str], have: list[str]) -> float:
    """Fraction of `wanted` parents found in `have`, in order (phases, p1 in phases.p1.optimizer)."""
    if not wanted:
        return 1.0
    i = found = 0
    for part in wanted:
        while i < len(have) and have[i] != part:
            i += 1
        if i < len(have):
            found += 1
            i += 1
    return found / len(wanted)
