"""`make generate PROMPT=" The ..."` asks what `aim generate --prompt " The ..."` asks: make strips the
blanks that begin a command-line value, so the Makefile reads the prompt back as typed. (For keyed
noise another prompt is another draw; for any model, another question.)"""

from __future__ import annotations

import shutil

from tests.conftest import link_or_copy
from tests.test_makefile import make, pytestmark  # noqa: F401  (skipped without make)


def test_a_prompts_leading_blanks_survive_make(tmp_path, build_folder):
    out = tmp_path / "out"
    shutil.copytree(build_folder("llama"), out / "llama", copy_function=link_or_copy)  # built: make reuses it
    for prompt in ("  The x", " def main():\n"):
        result = make("generate", MODEL="llama", OUT=str(out), PROMPT=prompt, MAX_NEW_TOKENS="1")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(prompt), (prompt, result.stdout)
