"""The package's layers (docs/architecture.md): every module imports only from its own layer or
the ones below, never upward, at module level or inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ia3fuse"

# Lowest first. Within a layer, modules may import each other; a subpackage is its own unit.
LAYERS: list[set[str]] = [
    {"errors", "_io", "_logs", "_runtime", "_text", "_version"},
    {"adapter", "weights", "fusion"},
    {"stack", "recipe"},
    {"merging", "scaling", "forms"},
    {"live", "mixture", "router", "search"},
    {"folding"},
    {"cli", "tables", "demo", "studio", "_tiny_models", "__init__", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str:
    """'ia3fuse.folding.gguf' -> 'folding'; 'ia3fuse' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks: imports for annotations only, never run."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, ia3fuse module) of every import in ``path`` that runs, resolved to absolute names."""
    package = list(path.relative_to(SRC.parent).with_suffix("").parts[:-1])
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    out = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            if not (name == "ia3fuse" or name.startswith("ia3fuse.")):
                continue
            # ``from pkg import x``: x is a module of pkg, or a name defined in pkg
            subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            out += [(node.lineno, n) for n in subs] or [(node.lineno, name)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("ia3fuse")]
    return out


def test_every_module_is_in_a_layer() -> None:
    units = {p.stem if p.parent == SRC else p.relative_to(SRC).parts[0] for p in SRC.rglob("*.py")}
    assert units <= set(LAYER), f"add {sorted(units - set(LAYER))} to a layer here and in docs/architecture.md"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_upward(path: Path) -> None:
    me = _unit(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
    upward = [f"line {line}: {name}" for line, name in _imports(path) if LAYER[_unit(name)] > LAYER[me]]
    assert not upward, f"{path.relative_to(SRC)} (layer {LAYER[me]}, {me}) imports upward: {upward}"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_the_benchmarks_or_the_tests(path: Path) -> None:
    """They live in the repository, not in an installed package (docs/architecture.md)."""
    outside = {"benchmarks", "tests", "factories", "archs", "conftest"}
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found += [(node.lineno, node.module)] if node.module.split(".")[0] in outside else []
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] in outside]
    assert not found, f"{path.relative_to(SRC)} imports {found}"
