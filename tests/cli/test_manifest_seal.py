"""The manifest's seal covers every field it holds: a hand edit of any top-level field (its
modulation, its verification, its profile, ...) is refused, not obeyed. The fields are read from a
real build's manifest.json, so a field added later is covered too."""

from __future__ import annotations

import json

import pytest

from aim.cli import main
from aim.layout import MANIFEST, Manifest, ManifestError


def edited(value):
    """Another value of the same kind: what a hand edit of the field might leave."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + " (edited)"
    if isinstance(value, list):
        return [*value, "edited"]
    if isinstance(value, dict):
        return {**value, "edited": True}
    return "edited"  # None


def test_every_top_level_field_is_sealed(build_folder, tmp_path, capsys):
    original = json.loads((build_folder("resnet") / MANIFEST).read_text())
    fields = sorted(key for key in original if key != "digest")
    assert {"modulation", "verification", "artifacts", "profile", "source", "graph"} <= set(fields)
    folder = tmp_path / "resnet"
    folder.mkdir()
    for field in fields:
        (folder / MANIFEST).write_text(json.dumps({**original, field: edited(original[field])}, indent=2))
        refused = "another version" if field == "schema" else "edited after it was written"
        with pytest.raises(ManifestError, match=refused):
            Manifest.load(folder)
    (folder / MANIFEST).write_text(json.dumps({**original, "modulation": {**original["modulation"], "noise": "keyed"}}))
    assert main(["verify", str(folder)]) == 2 and "edited after it was written" in capsys.readouterr().err
    (folder / MANIFEST).write_text(json.dumps(original))
    assert Manifest.load(folder).model == "resnet"  # unedited, the same file reads
