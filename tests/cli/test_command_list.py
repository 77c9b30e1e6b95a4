"""The CLI's commands are listed once, by the sub-parsers' own help strings: `aim --help` prints them,
the README's "CLI at a glance" is drawn from them, and `make help` lists the Makefile's targets (each
once), not the commands."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from aim.cli import COMMANDS, commands, glance, main

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- aim --help: begin -->", "<!-- aim --help: end -->"


def readme_glance() -> str:
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, f"README.md lost its markers {BEGIN} ... {END}"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def command_modules() -> set[str]:
    """Modules of aim/cli that define `add(sub)`, read from the source (not from COMMANDS)."""
    found = set()
    for path in (ROOT / "aim" / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "add" for node in tree.body):
            found.add(path.stem)
    return found


def test_every_command_module_is_registered():
    assert command_modules() == set(COMMANDS)


def test_readme_glance_is_the_parsers_list():
    expected = glance()
    assert readme_glance() == expected, (
        f"README.md's CLI at a glance differs from the commands' help strings; between {BEGIN} and {END} put:\n"
        + expected
    )


def test_aim_help_and_the_glance_name_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    lines = readme_glance().splitlines()
    for name, text in commands():
        assert text, f"aim {name} has no help string"
        assert re.search(rf"^\s+{re.escape(name)}\s", printed, re.M), f"aim --help does not list {name}"
        assert sum(line.split()[1] == name for line in lines) == 1, f"the README's glance lists {name} not once"
    assert len(lines) == len(commands())


def phony_targets() -> set[str]:
    makefile = (ROOT / "Makefile").read_text()
    (line,) = re.findall(r"^\.PHONY:(.*)$", makefile, re.M)
    return set(line.split())


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_lists_each_target_once_and_no_command():
    printed = subprocess.run(
        ["make", "--no-print-directory", "-s", "-C", str(ROOT), "help"], capture_output=True, text=True, check=True
    ).stdout
    listed = [line.split()[1] for line in printed.splitlines() if line.startswith("make ")]
    assert sorted(listed) == sorted(phony_targets() - {"help"}), "make help must list every target, each once"
    assert not [line for line in printed.splitlines() if line.startswith("aim ")], "commands belong to aim --help"
