"""Imports point down only: orchestration -> evaluation -> the three stages -> core.

Every import in every module is read from its source (those inside functions too, which is where
the stages load their heavy frameworks), so an upward import fails here however lazily it is made.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("corral", "data_gen", "training", "inference", "evaluation")
ORCHESTRATION = {"corral.cli", "corral.demo", "train"}
RANK = {"core": 0, "stage": 1, "evaluation": 2, "orchestration": 3}
STAGES = ("data_gen", "training", "inference")
# Where one stage truly uses another: the module says which and why in its docstring.
DECLARED_STAGE_USES = {"data_gen.preferences": "inference", "data_gen.teachers": "inference"}


def layer_of(module: str) -> str:
    if module in ORCHESTRATION:
        return "orchestration"
    top = module.split(".")[0]
    if top == "corral":
        return "core"
    if top in STAGES:
        return "stage"
    if top == "evaluation":
        return "evaluation"
    raise ValueError(module)


def project_modules() -> dict[str, Path]:
    modules = {"train": REPO / "train.py"}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_project_modules(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def upward_imports() -> list[str]:
    problems = []
    for module, path in project_modules().items():
        layer = layer_of(module)
        for target in imported_project_modules(path):
            target_layer = layer_of(target)
            if target_layer == "orchestration" and layer != "orchestration":
                problems.append(f"{module} imports the orchestration module {target}")
            elif RANK[target_layer] > RANK[layer]:
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
            elif layer == "stage" and target_layer == "stage":
                if target.split(".")[0] != module.split(".")[0]:
                    if DECLARED_STAGE_USES.get(module) != target.split(".")[0]:
                        problems.append(f"stage module {module} imports another stage: {target}")
    return sorted(problems)


def test_imports_only_point_down():
    assert upward_imports() == []


def test_a_declared_use_of_another_stage_says_why_in_its_docstring():
    modules = project_modules()
    for module, stage in DECLARED_STAGE_USES.items():
        docstring = ast.get_docstring(ast.parse(modules[module].read_text(encoding="utf-8")))
        assert docstring and "stage 1 uses stage 3" in docstring and f"`{stage}" in docstring


def test_the_walk_sees_lazy_imports(tmp_path):
    """The checker itself: an import inside a function counts like one at the top."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from corral.cli import main\n    import inference.engine\n")
    assert imported_project_modules(source) == {"corral.cli", "inference.engine"}


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("corral.records", "core"),
        ("corral.cli", "orchestration"),
        ("data_gen.pipeline", "stage"),
        ("evaluation.report", "evaluation"),
        ("train", "orchestration"),
    ],
)
def test_layer_names(module, layer):
    assert layer_of(module) == layer


def test_every_package_is_walked():
    modules = project_modules()
    for expected in ("corral.rundir", "corral.errors", "evaluation.commands", "training.loop"):
        assert expected in modules
