"""The documentation stays true: the annotated tree in docs/layout.md names every product module,
script and benchmark, and every path it names exists; every page the README links exists."""

from __future__ import annotations

import re

from project import REPO, product_files

LAYOUT = REPO / "docs" / "layout.md"
# Folders whose every file the tree must list (tests/ lists only the files worth pointing at).
LISTED_IN_FULL = (
    "corral",
    "data_gen",
    "training",
    "inference",
    "evaluation",
    "scripts",
    "benchmarks",
)


def tree_paths() -> set[str]:
    """Paths named by the tree: two spaces of indent per folder level, folders end with '/'."""
    block = LAYOUT.read_text(encoding="utf-8").split("```")[1]
    paths, parents = set(), []
    for line in block.strip("\n").splitlines():
        indent = (len(line) - len(line.lstrip(" "))) // 2
        if indent > len(parents):  # a description's second line
            continue
        name = line.strip().split()[0]
        parents = parents[:indent]
        path = "".join(parents) + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            parents.append(name)
    return paths


def test_every_path_in_the_tree_exists():
    missing = sorted(p for p in tree_paths() if not (REPO / p).exists())
    assert missing == []


def test_the_tree_lists_every_module_script_and_benchmark():
    listed = tree_paths()
    files = [*product_files(), *(REPO / "scripts").glob("*"), *(REPO / "benchmarks").glob("*.py")]
    unlisted = sorted(
        str(path.relative_to(REPO))
        for path in files
        if path.parts[len(REPO.parts)] in LISTED_IN_FULL
        and path.is_file()
        and str(path.relative_to(REPO)) not in listed
        and path.name != "__init__.py"
    )
    assert unlisted == []


def test_the_readme_links_only_pages_that_exist():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links its docs pages"
    assert [link for link in links if not (REPO / link).is_file()] == []


def test_the_readme_stays_a_map():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
