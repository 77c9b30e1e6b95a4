"""The owner's tier table (aim/serving/tiers.py) and `aim tiers key`, without a server."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

import aim.cli as cli
from aim.errors import InvalidInputError
from aim.serving.tiers import TierError, TierTable

EXAMPLE = {  # the issue's form, which other tools write too
    "default": "free",
    "tiers": {"free": {"utility": 3.0}, "pro": {"level": 0.8}, "premium": {"utility": 0.0}},
    "keys": {},
}


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def test_the_issues_example_parses_and_a_level_needs_a_calibrated_build():
    table = TierTable.parse(EXAMPLE)
    assert table.default == "free" and [t.name for t in table.tiers.values()] == ["free", "pro", "premium"]
    with pytest.raises(TierError, match="'pro' gives a calibrated level .* not calibrated"):
        table.resolved(None)
    # a calibration table level -> sigma (as `aim calibrate` records it): 0.8 lies between 0.5 (sigma 3)
    # and 1 (sigma 0), linearly: 3 - 3 * (0.8 - 0.5) / 0.5 = 1.2
    resolved = table.resolved({"levels": [0.0, 0.5, 1.0], "sigmas": [6.0, 3.0, 0.0]})
    assert [resolved.sigma(name) for name in ("free", "pro", "premium")] == pytest.approx([3.0, 1.2, 0.0])


BAD = {
    "no tiers": ({"default": "free", "tiers": {}}, "no tiers"),
    "an unknown default": ({**EXAMPLE, "default": "gold"}, 'default tier "gold" is not one of its tiers'),
    "a key of an unknown tier": ({**EXAMPLE, "keys": {digest("k"): "gold"}}, 'tier "gold", which is not one of'),
    "a key in clear": ({**EXAMPLE, "keys": {"my-secret-key": "premium"}}, "never stored in clear"),
    "a NaN utility": ({**EXAMPLE, "tiers": {"free": {"utility": math.nan}}}, "must be a finite number"),
    "a negative utility": ({**EXAMPLE, "tiers": {"free": {"utility": -1}}}, "must lie in [0"),
    "a huge utility": ({**EXAMPLE, "tiers": {"free": {"utility": 1e30}}}, "must lie in [0"),
    "a utility as text": ({**EXAMPLE, "tiers": {"free": {"utility": "3"}}}, "must be a finite number"),
    "a utility as a boolean": ({**EXAMPLE, "tiers": {"free": {"utility": True}}}, "must be a finite number"),
    "a level above 1": ({**EXAMPLE, "tiers": {"free": {"level": 1.5}}}, "utility_level must lie in [0, 1]"),
    "both knobs": ({**EXAMPLE, "tiers": {"free": {"utility": 1, "level": 0.5}}}, "exactly one of"),
    "an unknown field": ({**EXAMPLE, "owner": "me"}, "unknown fields ['owner']"),
    "a bad tier name": ({**EXAMPLE, "tiers": {"free tier": {"utility": 1}}}, "a tier name has"),
}


@pytest.mark.parametrize("how", sorted(BAD))
def test_aim_triton_refuses_a_bad_tiers_file_with_one_error_line_and_writes_nothing(
    build_folder, tmp_path, capsys, how
):
    data, said = BAD[how]
    tiers = write(tmp_path / "tiers.json", data)
    repo = tmp_path / "repo"
    assert cli.main(["triton", str(build_folder("resnet")), "--repository", str(repo), "--tiers", tiers]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and said in err, err
    assert not repo.exists()


def test_a_request_gets_its_keys_tier_and_anything_else_the_default():
    table = TierTable.parse({**EXAMPLE, "keys": {digest("gold-key"): "premium", digest("pro-key"): "pro"}})
    assert table.tier_of([]) == "free"
    assert table.tier_of(["Bearer gold-key"]) == "premium" and table.tier_of(["bearer  gold-key "]) == "premium"
    assert table.tier_of(["Bearer pro-key"]) == "pro"
    assert table.tier_of(["Bearer gold-key", "Bearer gold-key"]) == "premium"  # the same value twice is one
    for anything_else in (
        "gold-key",  # no scheme
        "Basic gold-key",
        "Bearer",
        "Bearer premium",  # a tier's name is no key
        f"Bearer {digest('gold-key')}",  # nor is what the table stores
        f"Bearer {digest('gold-key')[7:]}",
        "Bearer gold-key2",
    ):
        assert table.tier_of([anything_else]) == "free", anything_else
    with pytest.raises(InvalidInputError, match="more than one Authorization value"):
        table.tier_of(["Bearer pro-key", "Bearer gold-key"])


def test_aim_tiers_key_prints_the_key_once_and_stores_its_digest_only(tmp_path, capsys):
    tiers = tmp_path / "tiers.json"
    write(tiers, EXAMPLE)
    tiers.chmod(0o600)
    keys = []
    for tier in ("premium", "premium", "pro"):
        assert cli.main(["tiers", "key", tier, "--tiers", str(tiers)]) == 0
        keys.append(capsys.readouterr().out.strip().splitlines()[-1])  # the last line is the key
    assert len(set(keys)) == 3 and all(len(key) >= 32 for key in keys)  # >= 128 random bits, base64url
    text = tiers.read_text()
    assert not any(key in text for key in keys) and (tiers.stat().st_mode & 0o777) == 0o600
    table = TierTable.load(tiers)
    assert table.keys == {digest(keys[0]): "premium", digest(keys[1]): "premium", digest(keys[2]): "pro"}
    assert [table.tier_of([f"Bearer {key}"]) for key in keys] == ["premium", "premium", "pro"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiers.json"]  # written in place, nothing beside it

    assert cli.main(["tiers", "key", "gold", "--tiers", str(tiers)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "no tier 'gold'" in err
    assert tiers.read_text() == text  # a refused key changes nothing
    assert cli.main(["tiers", "key", "premium", "--tiers", str(tmp_path / "none.json")]) == 2
    assert "no tiers file at" in capsys.readouterr().err

    assert cli.main(["tiers", "show", "--tiers", str(tiers)]) == 0
    shown = capsys.readouterr().out
    assert "premium" in shown and "2 keys" in shown and "default" in shown and not any(k in shown for k in keys)
