"""The package's layering, read from the modules' own imports (every import, a function's local ones included;
those under ``if TYPE_CHECKING:`` run never and are left out): a module imports only from its own layer or the
layers below it, and no chain of imports comes back to where it started. A new module is placed in one layer
here, or the test names it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kcdlib"

# Bottom to top. A unit is a top-level module or a subpackage (``models``, ``data``, ``artefacts``, ``reference``).
LAYERS = (
    (
        "foundation",
        {
            "__init__",
            "errors",
            "files",
            "options",
            "registry",
            "recipe",
            "cost",
            "fastpath",
            "provenance",
            "sharedfs",
            "reference",
        },
    ),  # fmt: skip
    ("components", {"models", "condense", "distillers", "methods", "released", "data"}),
    ("engine", {"train", "distributed", "trainers", "identity", "records", "folders"}),
    ("store", {"runs", "verify", "parallel", "runpages", "archive"}),
    ("declarations", {"profiles", "buildoptions", "artefacts"}),
    ("build", {"plan", "estimate", "book", "cluster", "slurmjobs"}),
    ("interface", {"cli", "__main__"}),
)
LAYER = {unit: i for i, (_, units) in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name | ast.Attribute) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its code."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kcdlib")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "kcdlib":
                for alias in node.names:  # `from . import x` imports the submodule x when there is one
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in known else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found = {m if m in known else m.rsplit(".", 1)[0] for m in found}
    return {m for m in found if m in known and m != name}


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_every_module_has_a_layer():
    assert sorted({unit(m) for m in GRAPH} - set(LAYER)) == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = [
        f"{m} ({LAYERS[LAYER[unit(m)]][0]}) imports {t} ({LAYERS[LAYER[unit(t)]][0]})"
        for m, targets in GRAPH.items()
        for t in sorted(targets)
        if unit(m) in LAYER and unit(t) in LAYER and LAYER[unit(t)] > LAYER[unit(m)]
    ]
    assert not upward, "\n".join(upward)


def _cycle() -> list[str] | None:
    """One chain of imports that comes back to its start, if any (a package's ``__init__`` importing its own
    submodules, and they importing names from it, is how a package is put together and is not counted)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def edges(m: str) -> list[str]:
        return [t for t in sorted(GRAPH[m]) if not m.startswith(t + ".")]

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in edges(m):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (found := visit(t)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_loop():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_is_over_450_lines(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= 450, f"{name} has {lines} lines"
