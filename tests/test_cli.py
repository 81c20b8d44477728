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


def test_top_level_help_lists_every_command_and_exits_0():
    """`python -m corral.cli --help` in a fresh process: every command, with its one-line help."""
    result = subprocess.run(
        [sys.executable, "-m", "corral.cli", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    commands = {choice.dest: choice.help for choice in subparsers._choices_actions}
    assert commands.keys() == subparsers.choices.keys()  # every command has a help line
    assert {"model", "generate", "train", "serve", "eval", "demo"} <= commands.keys()
    listed = " ".join(result.stdout.split())  # argparse wraps long help lines
    for name, help_text in commands.items():
        assert f" {name} {' '.join(help_text.split())}" in listed, name


def test_unknown_model_folder_is_one_line_exit_2(capsys):
    assert main(["model", "prepare", "./no/such/folder"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "corral: error: ./no/such/folder: no such model folder"


def test_the_demo_prints_each_steps_time(capsys):
    from corral.cli.demo import _Steps

    steps = _Steps(3)
    steps.begin("generate 4 instructions")
    steps.begin("train a LoRA")
    steps.begin("generate again")
    steps.end()
    steps.end()  # a second end adds nothing
    out = capsys.readouterr().out
    assert "=== [1/3] generate 4 instructions" in out and "=== [2/3] train a LoRA" in out
    assert out.count("took") == 3 and "--- step 3 took" in out
    assert list(steps.times) == ["generate", "train", "generate (3)"]
