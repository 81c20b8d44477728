"""Imports point down only: orchestration -> evaluation -> the three stages -> core.

Every import in every module is read from its source (those inside functions too, which is where
the stages load their heavy frameworks), and so is every string that names a project module (what
`importlib.import_module` loads), so an upward import fails here however it is made.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from project import REPO, package_folders, project_modules

ORCHESTRATION_PACKAGES = ("corral.cli",)
RANK = {"core": 0, "stage": 1, "evaluation": 2, "orchestration": 3}
STAGES = ("corral.data_gen", "corral.training", "corral.inference")
# Where one stage truly uses another: the module says which and why in its docstring.
DECLARED_STAGE_USES = {
    "corral.data_gen.preferences": "corral.inference",
    "corral.data_gen.teachers": "corral.inference",
    "corral.training.rollouts": "corral.inference",
}
STAGE_NUMBERS = {"corral.data_gen": 1, "corral.training": 2, "corral.inference": 3}


def _package_of(module: str, packages: tuple[str, ...]) -> str | None:
    return next((p for p in packages if module == p or module.startswith(p + ".")), None)


def layer_of(module: str) -> str:
    if module == "train" or _package_of(module, ORCHESTRATION_PACKAGES):
        return "orchestration"
    if _package_of(module, STAGES):
        return "stage"
    if _package_of(module, ("corral.evaluation",)):
        return "evaluation"
    if _package_of(module, ("corral",)):
        return "core"
    raise ValueError(module)


def imported_project_modules(path: Path, known: set[str] | None = None) -> set[str]:
    """Project modules that `path` imports anywhere in its body, or names in a string constant
    (a module loaded by `importlib.import_module("corral.training.commands")` counts)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and known:
            names = [node.value] if node.value in known else []
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == "corral")
    return found


def upward_imports() -> list[str]:
    problems = []
    modules = project_modules()
    for module, path in modules.items():
        layer = layer_of(module)
        for target in imported_project_modules(path, set(modules)):
            target_layer = layer_of(target)
            if target_layer == "orchestration" and layer != "orchestration":
                problems.append(f"{module} imports the orchestration module {target}")
            elif RANK[target_layer] > RANK[layer]:
                problems.append(f"{module} ({layer}) imports {target} ({target_layer})")
            elif layer == "stage" and target_layer == "stage":
                own, other = _package_of(module, STAGES), _package_of(target, STAGES)
                if own != other and DECLARED_STAGE_USES.get(module) != other:
                    problems.append(f"stage module {module} imports another stage: {target}")
    return sorted(problems)


def test_imports_only_point_down():
    assert upward_imports() == []


def test_a_declared_use_of_another_stage_says_why_in_its_docstring():
    modules = project_modules()
    for module, stage in DECLARED_STAGE_USES.items():
        docstring = ast.get_docstring(ast.parse(modules[module].read_text(encoding="utf-8")))
        short = stage.removeprefix("corral.")
        own = STAGE_NUMBERS[_package_of(module, STAGES)]
        says = f"stage {own} uses stage {STAGE_NUMBERS[stage]}"
        assert docstring and says in docstring and f"`{short}" in docstring, module


def test_the_walk_sees_lazy_imports_and_importlib_names(tmp_path):
    """The checker itself: an import inside a function counts like one at the top, and so does a
    module named in a string for importlib."""
    source = tmp_path / "m.py"
    source.write_text(
        "import importlib\n"
        "def f():\n    from corral.cli import main\n    import corral.inference.engine\n"
        "def g():\n    return importlib.import_module('corral.training.commands')\n"
    )
    found = imported_project_modules(source, {"corral.training.commands"})
    assert found == {"corral.cli", "corral.inference.engine", "corral.training.commands"}


def test_an_importlib_load_of_a_higher_layer_is_caught(tmp_path, monkeypatch):
    """A core module that loads a stage by name is an upward import like any other."""
    modules = project_modules()
    core = tmp_path / "sneaky.py"
    core.write_text("import importlib\nimportlib.import_module('corral.training.loop')\n")
    monkeypatch.setitem(modules, "corral.sneaky", core)
    monkeypatch.setattr(sys.modules[__name__], "project_modules", lambda: modules)
    assert upward_imports() == ["corral.sneaky (core) imports corral.training.loop (stage)"]


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("corral.records", "core"),
        ("corral.cli", "orchestration"),
        ("corral.cli.demo", "orchestration"),
        ("corral.data_gen.pipeline", "stage"),
        ("corral.evaluation.report", "evaluation"),
        ("train", "orchestration"),
    ],
)
def test_layer_names(module, layer):
    assert layer_of(module) == layer


def test_every_package_is_walked_by_its_installed_name():
    modules = project_modules()
    for expected in (
        "corral.rundir",
        "corral.errors",
        "corral.evaluation.commands",
        "corral.training.loop",
        "corral.cli.demo",
    ):
        assert expected in modules
    assert not [m for m in modules if m.split(".")[0] not in ("corral", "train")]


@pytest.mark.slow
def test_a_built_wheel_installs_one_namespace(tmp_path):
    """`pip install .` (not editable) gives `corral.*` only, with its data files; `import training`
    then fails and `corral --help` works."""
    # Built from a copy: setuptools leaves a build/ folder in the tree it builds.
    source = tmp_path / "source"
    skipped = (".git", ".venv*", "build", "runs", "demo_output", "__pycache__", "*.egg-info")
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*skipped))
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("corral-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"corral"}
    for folder in package_folders():
        assert folder.replace(".", "/") + "/__init__.py" in names
    assert any(n.startswith("corral/data_gen/seeds/") and n.endswith(".jsonl") for n in names)
    assert "corral/inference/web/index.html" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    # The installed copy comes first on the path; the working directory is not the repository.
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    probe = (
        "import corral, corral.training, corral.data_gen.pipeline, importlib.util, sys\n"
        f"assert corral.__file__.startswith({str(target)!r}), corral.__file__\n"
        "assert corral.training.__file__.startswith(corral.__path__[0])\n"
        "for name in ('training', 'inference', 'data_gen', 'evaluation'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
    )
    checked = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stderr[-2000:]
    helped = subprocess.run(
        [sys.executable, "-m", "corral.cli", "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr[-2000:]
    for command in ("generate", "train", "serve", "eval", "demo"):
        assert command in helped.stdout
