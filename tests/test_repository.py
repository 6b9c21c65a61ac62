"""The repository explains itself: an import graph without cycles, no reference to a missing file, no machine path."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dcae_train"
OPTIONAL_HEAVY = ("wandb", "matplotlib", "timm")  # imported where they are used, so the rest never pays for them
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".cfg", ".txt"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "outputs", "build", "dist",
             "dcae_train.egg-info"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _target(name: str, imported: str | None = None) -> str | None:
    """The package module an import statement loads: `from a.b import c` is a.b.c when c is a module."""
    if imported is not None and f"{name}.{imported}" in MODULES:
        return f"{name}.{imported}"
    return name if name in MODULES else None


def import_edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [_target(a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [_target(node.module, a.name) for a in node.names]
            else:
                continue
            graph[mod].update(t for t in targets if t and t != mod)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_edges()
    assert len(graph) > 40 and graph["dcae_train.cli"], "the graph was built"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_at_module_level():
    """No import inside a function or class (dependencies are visible at the top of each file), except the
    optional heavy packages used only where they are needed."""
    offenders = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for outer in ast.walk(tree):
            if not isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            for node in ast.walk(outer):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    if not all(n.split(".")[0] in OPTIONAL_HEAVY for n in names):
                        offenders.append(f"{mod}:{node.lineno} {names}")
    assert not offenders, offenders


def test_no_guarded_import_of_a_hard_dependency():
    offenders = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers
            ):
                offenders.append(f"{mod}:{node.lineno}")
    assert not offenders, offenders


# References to files -------------------------------------------------------------------------------------
def repo_text_files() -> list[Path]:
    """Every text file of the repository but this one (its tests name missing files and machine paths)."""
    if not _FILES:
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # never walk into .venv (it may sit in the repo)
            _FILES.extend(Path(folder, f) for f in files if Path(f).suffix in TEXT_SUFFIXES)
    return [p for p in _FILES if p != Path(__file__)]


_FILES: list[Path] = []


# A path-like token ending in a file type we write: `docs/recipe.md`, `scripts/make_shards.py`, `config.md`.
_REF = re.compile(r"(?<![\w/.:-])((?:\.\./|\./)?(?:[\w.-]+/)*[\w-]+\.(?:md|py|yaml|sh|toml))(?![\w/])")
_URL = re.compile(r"\w+://\S+")


# Files our tools write, named in the docs; sitecustomize.py: Python's start-up hook, which a test helper writes.
OUTPUT_NAMES = {"eval.md", "config.yaml", "config.resumed.yaml", "sitecustomize.py"}
# Files of other projects that the docs cite by name (the project is named beside each mention).
UPSTREAM_FILES = {
    "eval_dc_ae_model.py": "mit-han-lab/efficientvit",
    "applications/dc_ae/README.md": "mit-han-lab/efficientvit",
    "dc_ae_generate_latent.py": "mit-han-lab/efficientvit",
    "scripts/convert_dcae_to_diffusers.py": "huggingface/diffusers",
    "convert_dcae_to_diffusers.py": "huggingface/diffusers",
    "train_autoencoderkl.py": "huggingface/diffusers",
    "diffusion/data/datasets/utils.py": "NVlabs/Sana",
    "f16d32_vfdinov2.yaml": "hustvl/LightningDiT",
    "foundation_models.py": "hustvl/LightningDiT",
    "vavae/ldm/modules/losses/contperceptual.py": "hustvl/LightningDiT",
}


def missing_references(path: Path, text: str) -> list[str]:
    """Path-like names in `text` that are not files of the repository: a name with a folder must resolve from
    the repository root or from `path`'s folder; a bare name must be some file's name (`cli.py`, `train.yaml`)."""
    text = _URL.sub("", text)
    bad = []
    for m in _REF.finditer(text):
        ref = m.group(1)
        if ref in UPSTREAM_FILES:
            continue
        if "/" in ref:
            ok = any(c.exists() and c.resolve().is_relative_to(ROOT) for c in (ROOT / ref, path.parent / ref))
        else:
            ok = ref in OUTPUT_NAMES or ref in _basenames()
        if not ok:
            bad.append(ref)
    return bad


_NAMES: set[str] = set()


def _basenames() -> set[str]:
    if not _NAMES:
        _NAMES.update(p.name for p in repo_text_files())
    return _NAMES


def test_no_reference_to_a_file_missing_from_the_repository():
    problems = {}
    for path in repo_text_files():
        bad = missing_references(path, path.read_text(errors="replace"))
        if bad:
            problems[str(path.relative_to(ROOT))] = sorted(set(bad))
    assert not problems, problems


def test_reference_checker_catches_a_missing_file(tmp_path):
    assert missing_references(ROOT / "README.md", "see docs/no-such-page.md and docs/config.md") == [
        "docs/no-such-page.md"
    ]
    assert missing_references(PACKAGE / "models" / "x.py", "Facts: private-notes.md section 2") == ["private-notes.md"]
    notes = "../shared/reference/pitfalls.md"
    assert missing_references(PACKAGE / "x.py", f"see `{notes}`") == [notes]
    assert MACHINE_PATHS.search(f"see {notes}") and MACHINE_PATHS.search("Facts: /work/shared/x.md")
    assert not MACHINE_PATHS.search("data.train=/data/shards/train-{000000..000099}.tar")


MACHINE_PATHS = re.compile(r"(?<![\w.])(/work/|/home/\w|/root/|/Users/\w|/mnt/\w|/opt/\w|[A-Z]:\\\\)|\.\./shared")


def test_no_absolute_path_of_a_machine():
    hits = []
    for path in repo_text_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATHS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, hits


def test_every_package_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
