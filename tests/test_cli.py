"""The `corral` command line: help on every subcommand, one-line errors with exit status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from corral.cli import build_parser, main


def _all_subcommand_paths(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _all_subcommand_paths(sub, (*prefix, name))


def test_every_subcommand_has_help(capsys):
    paths = list(_all_subcommand_paths(build_parser()))
    assert ("model", "prepare") in paths and ("demo",) in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_info:
            main([*path, "--help"])
        assert exit_info.value.code == 0
        assert "usage: corral" in capsys.readouterr().out


def test_help_is_fast_and_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert "model" in result.stdout and "demo" in result.stdout


def test_unknown_model_folder_is_one_line_exit_2(capsys):
    assert main(["model", "prepare", "./no/such/folder"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "corral: error: ./no/such/folder: no such model folder"
