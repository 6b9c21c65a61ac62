"""Shard specs -> lists of shard URLs: brace patterns, `a::b` joins, folders, lists, weighted mixtures. Torch-free.

The forms (`data.train`, `data.val`):
  - `null` or `"demo"`: the embedded demo photographs (built into a cache folder on first use);
  - a string: one path/URL, a brace pattern `shards/train-{000000..000999}.tar`, several joined by `::`,
    a folder (all `*.tar` in it), or `pipe:`/`https://` URLs;
  - a list of such strings (one source);
  - a list of `{spec: ..., weight: ...}` (a mixture: each sample comes from a source with probability
    proportional to its weight).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import braceexpand

from dcae_train.schema import ConfigError

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "gs://", "s3://", "ais://")


@dataclass(frozen=True)
class Source:
    urls: tuple[str, ...]
    weight: float = 1.0


def is_demo(spec: Any) -> bool:
    return spec is None or spec == "demo"


def check_spec(spec: Any, where: str) -> None:
    """Shape check of a shard spec (no file access); `where` names the key in the error."""
    if is_demo(spec) or (isinstance(spec, str) and spec.strip()):
        return
    if not isinstance(spec, list | tuple) or not spec:
        raise ConfigError(where, spec, "give a shard path/pattern, a list of them, or a list of {spec, weight}")
    if all(isinstance(s, str) and s for s in spec):
        return
    for i, entry in enumerate(spec):
        if not (isinstance(entry, dict) and "spec" in entry):
            raise ConfigError(f"{where}[{i}]", entry, "mixture entries are {spec: <shards>, weight: <float>}")
        extra = sorted(set(entry) - {"spec", "weight"})
        if extra:
            raise ConfigError(f"{where}[{i}]", entry, f"unknown key(s) {extra}; an entry has only spec and weight")
        if float(entry.get("weight", 1.0)) <= 0:
            raise ConfigError(f"{where}[{i}].weight", entry.get("weight"), "must be > 0", 1.0)
        check_spec(entry["spec"], f"{where}[{i}].spec")


def expand_urls(spec: str | list[str]) -> list[str]:
    """A string (brace pattern, `a::b`, a folder of .tar files, URL) or a list of them -> shard URLs."""
    if isinstance(spec, list | tuple):
        return [u for s in spec for u in expand_urls(s)]
    urls: list[str] = []
    for part in str(spec).split("::"):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            urls.extend(sorted(glob.glob(os.path.join(part, "*.tar"))))
        else:
            urls.extend(braceexpand.braceexpand(part))
    return urls


def sources_from_spec(spec: Any, where: str) -> list[Source]:
    """A checked spec -> sources (one, or one per mixture entry); local shards must exist."""
    if isinstance(spec, list | tuple) and spec and isinstance(spec[0], dict):
        sources = [Source(tuple(expand_urls(e["spec"])), float(e.get("weight", 1.0))) for e in spec]
    else:
        sources = [Source(tuple(expand_urls(spec)))]
    for i, src in enumerate(sources):
        if not src.urls:
            raise ConfigError(where, spec, f"source {i} expands to no shards; check the path or pattern")
        missing = [u for u in src.urls if not u.startswith(REMOTE_PREFIXES) and not os.path.exists(u)]
        if missing:
            raise ConfigError(
                where,
                spec,
                f"{len(missing)} of {len(src.urls)} shards do not exist, e.g. {missing[:3]}; fix the path/pattern "
                "(or make shards with scripts/make_shards.py)",
            )
    return sources
