"""The Makefile passes every user variable to the commands as data: a model name with shell code in it
is a name that does not exist, OUT may have a space, PROMPT keeps its quotes, FOCUS may start with '-'."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import link_or_copy

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # this interpreter's environment, unresolved: never the base Python


def make(target: str, **variables: str) -> subprocess.CompletedProcess:
    """`make TARGET VAR=value...` with this environment's Python; the set-up target is taken as done (-o)."""
    stamp = VENV / ".installed-stamp"
    argv = ["make", "--no-print-directory", "-C", str(ROOT), target, f"VENV={VENV}", "-o", str(stamp)]
    dry = subprocess.run([*argv, "-n", *(f"{k}={v}" for k, v in variables.items())], capture_output=True, text=True)
    assert "pip install" not in dry.stdout and "-m venv" not in dry.stdout, dry.stdout  # never sets anything up
    return subprocess.run(
        [*argv, "-s", *(f"{k}={v}" for k, v in variables.items())], capture_output=True, text=True, timeout=300
    )


pytestmark = pytest.mark.skipif(
    shutil.which("make") is None or not (VENV / "bin" / "python").exists(),
    reason="needs make and a virtual environment",
)


def test_shell_code_in_model_is_a_model_name(tmp_path):
    before = sorted(os.listdir(ROOT / "build")) if (ROOT / "build").is_dir() else None
    result = make("engine", MODEL="resnet; echo INJECTED", OUT=str(tmp_path / "out"))
    assert result.returncode != 0
    assert "unknown model 'resnet; echo INJECTED'" in result.stderr
    assert "INJECTED" not in result.stdout  # the shell never ran the echo
    assert not (tmp_path / "out").exists()
    assert (sorted(os.listdir(ROOT / "build")) if (ROOT / "build").is_dir() else None) == before  # ./build untouched


def test_out_with_a_space_prompt_with_quotes_focus_with_a_dash(tmp_path, build_folder):
    out = tmp_path / "my build"
    shutil.copytree(
        build_folder("llama"), out / "llama", copy_function=link_or_copy
    )  # the build exists: make does not rebuild
    result = make("generate", MODEL="llama", OUT=str(out), PROMPT='say "hi"', MAX_NEW_TOKENS="2", FOCUS="-#7=100")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('say "hi"')
    assert "focus -#7=100 acts on" in result.stderr
