"""The project's modules under their installed names, read from setup.cfg's package mapping.

The repository keeps a folder per stage (`data_gen/`, `training/`, ...), but what installs is one
namespace (`corral.data_gen`, `corral.training`, ...): the tests that read the code walk it by the
names users import.
"""

from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package_folders() -> dict[str, Path]:
    """Installed package name -> its folder in the repository (setup.cfg's `package_dir`)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    folders = {}
    for line in config["options"]["package_dir"].strip().splitlines():
        name, _, folder = (part.strip() for part in line.partition("="))
        folders[name] = REPO / folder
    return folders


def project_modules() -> dict[str, Path]:
    """Every product module by its installed name (and train.py as `train`) -> its source file."""
    modules = {"train": REPO / "train.py"}
    folders = package_folders()
    # A package mapped to its own folder must not also claim the folders mapped elsewhere.
    mapped = {folder for name, folder in folders.items() if "." in name}
    for package, folder in folders.items():
        for path in sorted(folder.rglob("*.py")):
            if package == "corral" and any(m in path.parents for m in mapped):
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join((package, *parts))] = path
    return modules


def product_files() -> list[Path]:
    return sorted(set(project_modules().values()))
