"""Which code made a run: a digest of the code that decides its numbers, and the checkout it was loaded from.

The digest is part of every run's identity (:func:`kcdlib.identity.identity`), so a change to a loss, the
engine, a schedule, the data pipeline or an architecture makes every run it could change another run, without
anyone remembering to bump :data:`kcdlib.NUMERICS_VERSION` (which stays, for changes outside these modules).

What counts is the *program*, not its text: each module of :data:`CODE_MODULES` is parsed and its syntax tree,
with docstrings dropped, is hashed. So editing a comment, a docstring or the formatting (ruff format) keeps every
run's identity; a changed statement, constant or default changes it. Notebooks, the book, the CLI, the plan and the
run store itself (which finds files, not numbers) are outside it. The tree is written out by :func:`_canonical`
rather than ``ast.dump``, skipping empty fields, so the digest is the same under each Python version the project
supports (3.12 added fields such as ``type_params`` that are empty in this code).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import subprocess
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# The modules (and packages: every .py under them) whose code decides a run's numbers.
CODE_MODULES = (
    "condense", "cost.py", "data", "distillers.py", "distributed.py", "fastpath.py", "methods.py",
    "models", "recipe.py", "train.py", "trainers.py",
)  # fmt: skip


def code_files() -> list[Path]:
    """The source files of :data:`CODE_MODULES`, in a fixed order."""
    found = []
    for name in CODE_MODULES:
        path = PACKAGE / name
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) or not body:
            continue
        first = body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def _canonical(node) -> str:
    """A syntax tree as text: node types and non-empty fields, no positions."""
    if isinstance(node, ast.AST):
        fields = []
        for name in node._fields:
            value = getattr(node, name, None)
            if value is None or value == []:
                continue
            fields.append(f"{name}={_canonical(value)}")
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return repr(node)


def module_digest(source: str) -> str:
    """The SHA-256 of one module's program (docstrings, comments and layout left out)."""
    tree = _without_docstrings(ast.parse(source))
    return hashlib.sha256(_canonical(tree).encode()).hexdigest()


@functools.cache
def code_digest() -> str:
    """16 hex digits naming the code of :data:`CODE_MODULES` this process loaded (read once, at first use)."""
    digest = hashlib.sha256()
    for path in code_files():
        digest.update(f"{path.relative_to(PACKAGE).as_posix()}\0{module_digest(path.read_text())}\n".encode())
    return digest.hexdigest()[:16]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.cache
def checkout() -> dict[str, object]:
    """The checkout the code was loaded from, when this process first asked: its commit (None outside a checkout)
    and the package's tracked files that differ from that commit (paths relative to the repository), so a record
    made from a modified tree says so."""
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".") if commit else None
    modified = sorted(line[3:].strip() for line in (status or "").splitlines() if line.strip())
    return {"commit": commit, "modified": modified}
