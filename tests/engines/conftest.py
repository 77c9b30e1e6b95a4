"""Build folders (`make engine`'s output) shared by the Triton tests: each model built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.pipeline import build_model


@pytest.fixture(scope="session")
def build_folder(tmp_path_factory):
    """build_folder("resnet") -> Path of a verified build folder (built on first use)."""
    root = tmp_path_factory.mktemp("builds")
    built: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in built:
            manifest = build_model(model, root, log=lambda line: None)
            built[model] = Path(manifest["folder"])
        return built[model]

    return get
