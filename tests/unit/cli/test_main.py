"""``bastion``'s command tree: help without type tags, ``--version``, shell completion."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

import pytest
import typer.testing
from typer.testing import CliRunner

from bastion import __version__
from bastion.cli.main import command

#: What typer would print after an option or argument: ``<bool>``, ``<str>``, ``<int>``, ``<path>``...
TYPE_TAG = re.compile(r"<(bool|str|int|float|path|file|dir|list\[[a-z]+\]|[a-z]+\|[a-z|]+)>")


def _paths(cmd: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, sub in getattr(cmd, "commands", {}).items():
        found += _paths(sub, (*prefix, name))
    return found


PATHS = _paths(command())


@pytest.fixture(autouse=True)
def _runner_takes_click_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer's CliRunner builds the command from a Typer app; here it is given the built one."""
    monkeypatch.setattr(typer.testing, "_get_command", lambda cmd: cmd)


def test_every_command_is_covered() -> None:
    assert ("proxy", "mcp") in PATHS and ("audit", "search") in PATHS and ("completion",) in PATHS
    assert len(PATHS) > 30


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "bastion")
def test_help_has_no_type_tags(path: tuple[str, ...]) -> None:
    res = CliRunner().invoke(command(), [*path, "--help"], prog_name="bastion", env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert not TYPE_TAG.search(res.output), res.output
    assert "--help" in res.output


def test_options_show_what_they_take() -> None:
    res = CliRunner().invoke(command(), ["audit", "search", "--help"], env={"COLUMNS": "200"})
    rows = {" ".join(line.strip("│ ").split()[:3]) for line in res.output.splitlines()}
    for row in ("--since TIME RFC", "--limit N At", "--order desc|asc desc:", "--config -c FILE"):
        assert row in rows, res.output
    assert "--insecure Do not" in rows  # a flag shows nothing
    usage = CliRunner().invoke(command(), ["proxy", "mcp", "--help"], prog_name="bastion").output
    assert "Usage: bastion proxy mcp [OPTIONS] NAME" in usage


@pytest.mark.parametrize("args", [["--version"], ["version"]])
def test_version(args: list[str]) -> None:
    res = CliRunner().invoke(command(), args)
    assert (res.exit_code, res.output) == (0, f"bastion {__version__}\n")


def _bastion(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bastion.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,
    )


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str) -> None:
    res = _bastion("completion", shell)
    assert res.returncode == 0, res.stderr
    assert f"_BASTION_COMPLETE=complete_{shell}" in res.stdout


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    res = _bastion("completion", "tcsh", COLUMNS="200")
    assert res.returncode == 2 and "'tcsh' is not one of 'bash', 'zsh', 'fish'" in res.stderr


def test_bash_completion_completes() -> None:
    """What the bash script asks `bastion`, and what it gets back."""
    res = _bastion(_BASTION_COMPLETE="complete_bash", COMP_WORDS="bastion au", COMP_CWORD="1")
    assert res.returncode == 0 and sorted(res.stdout.split()) == ["audit", "auth"]
    res = _bastion(_BASTION_COMPLETE="complete_bash", COMP_WORDS="bastion audit search --or", COMP_CWORD="3")
    assert res.stdout.split() == ["--order"]
