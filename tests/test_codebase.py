"""Rules about the code itself: no dead code, dependency ranges that were tested, quiet imports."""

from __future__ import annotations

import ast
import configparser
import subprocess
import sys
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from project import REPO, product_files

# Entry points named by strings (setup.cfg's console script, the CLI's command-module list).
CALLED_BY_NAME = {"main", "register"}


def _top_level_names(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names.extend(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return names


def _used_names(tree: ast.Module) -> set[str]:
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
        elif isinstance(node, ast.Attribute):
            used.add(node.attr)
        elif isinstance(node, ast.alias):
            used.add(node.name.split(".")[-1])
    return used


def test_every_top_level_name_is_used_by_the_product_or_a_benchmark():
    """A function only a test calls is dead code kept alive by its test."""
    users = [*product_files(), *sorted((REPO / "benchmarks").glob("*.py"))]
    used: set[str] = set()
    for path in users:
        used |= _used_names(ast.parse(path.read_text(encoding="utf-8")))
    unused = [
        f"{path.relative_to(REPO)}: {name}"
        for path in product_files()
        for name in _top_level_names(ast.parse(path.read_text(encoding="utf-8")))
        if name not in used and name not in CALLED_BY_NAME and not name.startswith("__")
    ]
    assert unused == []


def _makefile_variable(name: str) -> str:
    for line in (REPO / "Makefile").read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{name} ") and "=" in line:
            return line.split("=", 1)[1].strip()
    raise AssertionError(f"Makefile sets no {name}")


def test_transformers_range_spans_three_minor_versions_tested_at_both_ends():
    """The range starts at the version the whole suite runs on (`make install` installs it) and
    admits at least the two minor releases after it; `make test-transformers-newest` runs the
    engine and training tests on the newest release the range admits."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    requirements = [
        Requirement(line.strip())
        for line in config["options"]["install_requires"].splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    transformers = next(r for r in requirements if r.name == "transformers")
    floor = _makefile_variable("TRANSFORMERS_FLOOR")
    lower = next(s.version for s in transformers.specifier if s.operator == ">=")
    assert floor.startswith(lower), (floor, transformers)
    major, minor = (int(part) for part in floor.split(".")[:2])
    for step in range(3):
        assert transformers.specifier.contains(f"{major}.{minor + step}.0"), transformers
    assert transformers.specifier.contains(version("transformers")), version("transformers")
    assert "test-transformers-newest" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_the_product_uses_only_public_transformers_modules():
    """Names from transformers' submodules (its cache layers, a model's modeling file) change
    between minor releases; the public top level and its logging are what the range promises."""
    public = {"transformers", "transformers.utils"}
    internal = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transformers"):
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [a.name for a in node.names if a.name.startswith("transformers")]
            else:
                continue
            internal += [f"{path.relative_to(REPO)}: {m}" for m in modules if m not in public]
    assert internal == []


@pytest.mark.slow  # a fresh interpreter imports torch, transformers, peft and bitsandbytes
def test_importing_the_4bit_stack_prints_nothing_a_user_cannot_act_on():
    result = subprocess.run(
        [sys.executable, "-c", "import corral.models, peft, bitsandbytes"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "kernels" not in result.stderr, result.stderr


def _asserts(function: ast.AST, helpers: set[str]) -> bool:
    """Whether `function` asserts: an assert statement, pytest.raises/warns/fail, or a call to an
    `assert_…` function or to a helper of its module that asserts."""
    for node in ast.walk(function):
        if isinstance(node, ast.Assert):
            return True
        if isinstance(node, ast.Attribute) and node.attr in {"raises", "warns", "fail"}:
            return True
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", "")
            if name.startswith("assert") or name in helpers:
                return True
    return False


def test_every_test_asserts_something():
    """A test that asserts nothing passes whatever the code does."""
    silent = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        helpers = {f.name for f in functions if not f.name.startswith("test")}
        helpers = {f.name for f in functions if f.name in helpers and _asserts(f, set())}
        for node in ast.walk(tree):
            is_test = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            if is_test and node.name.startswith("test") and not _asserts(node, helpers):
                silent.append(f"{path.relative_to(REPO)}::{node.name}")
    assert silent == []


def test_benchmarks_import_no_test_module_and_leave_sys_path_alone():
    """Benchmarks run as `python -m benchmarks.NAME` over the installed package: what they share
    with the tests lives in the product (corral.loopback, corral.training.mfu)."""
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    found = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                if getattr(node.value, "id", None) == "sys":
                    found.append(f"{path.name}: sys.path")
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else []
                names += [
                    a.name for a in getattr(node, "names", []) if isinstance(node, ast.Import)
                ]
                for name in filter(None, names):
                    top = name.split(".")[0]
                    if top == "tests" or top in test_modules:
                        found.append(f"{path.name}: imports {name}")
    assert found == []
