"""The owner's tier table: which key buys which tier, and what each tier's noise is.

    {"default": "free",
     "tiers": {"free": {"utility": 3.0}, "pro": {"level": 0.8}, "premium": {"utility": 0.0}},
     "keys": {"sha256:<hex digest of the key>": "premium"}}

A tier gives either a utility (sigma, in logit units) or a calibrated level in [0, 1] (for a build
that `aim calibrate` calibrated: the level becomes the sigma its table gives). A request's tier
comes from its credentials only: the key in `Authorization: Bearer <key>` is hashed and looked up;
no key, a malformed header or an unknown key gets the default tier. Keys are never stored: the table
holds their SHA-256, a new key is printed once by `aim tiers key` and then exists only with whoever
holds it. The knob values are checked by the contract's own checks (check_modulation, check_level),
so a tier can never ask for what `aim run` would refuse.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from aim.contract import check_level, check_modulation
from aim.errors import AimError, InvalidInputError
from aim.files import atomic_path, folder_lock, read_json

HASH_PREFIX = "sha256:"
KEY_PREFIX = "aim_"  # a key says what it is (secret scanners match on such prefixes)
KEY_BYTES = 32  # 256 random bits
BEARER = "bearer"
AUTHORIZATION = "authorization"  # the header (and so the request parameter Triton forwards it as)
_TIER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
EXAMPLE = '{"default": "free", "tiers": {"free": {"utility": 3.0}, "premium": {"utility": 0.0}}, "keys": {}}'


class TierError(AimError):
    """A tiers file that is unreadable, names an unknown tier, or gives a value no tier may have."""


def key_digest(key: str) -> str:
    """How the table stores a key: "sha256:<hex>" of its UTF-8 bytes."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)


def _number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TierError(f"{where} must be a finite number, got {json.dumps(value)}")
    return float(value)


@dataclass(frozen=True)
class Tier:
    name: str
    utility: float | None = None  # sigma in logit units
    level: float | None = None  # a calibrated level in [0, 1]

    @classmethod
    def parse(cls, name: str, entry) -> Tier:
        where = f"tier {name!r}"
        if not _TIER_NAME.match(name):
            raise TierError(f"{where}: a tier name has 1-64 letters, digits, '_', '-' or '.'")
        if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in ("utility", "level"):
            raise TierError(
                f'{where} is {json.dumps(entry)}: a tier gives exactly one of {{"utility": SIGMA}} (noise in '
                f'logit units, 0 = the exact model) or {{"level": L}} (a calibrated level in [0, 1], 1 = exact)'
            )
        kind, value = next(iter(entry.items()))
        value = _number(value, f"{where}'s {kind}")
        try:  # the contract's own checks: what `aim run` refuses, no tier may give
            if kind == "utility":
                check_modulation(value, None, 1, 1)
            else:
                check_level(value, 1)
        except InvalidInputError as error:
            raise TierError(f"{where}: {error}") from None
        return cls(name, **{kind: value})

    def to_json(self) -> dict:
        return {"utility": self.utility} if self.level is None else {"level": self.level}


@dataclass(frozen=True)
class TierTable:
    default: str
    tiers: dict[str, Tier]
    keys: dict[str, str] = field(default_factory=dict)  # "sha256:<hex>" -> tier name

    @classmethod
    def parse(cls, data, where: str = "the tiers file") -> TierTable:
        if not isinstance(data, dict):
            raise TierError(f"{where} must hold a JSON object like {EXAMPLE}")
        unknown = sorted(set(data) - {"default", "tiers", "keys"})
        if unknown:
            raise TierError(f"{where} has unknown fields {unknown}: it holds default, tiers and keys, as in {EXAMPLE}")
        entries = data.get("tiers")
        if not isinstance(entries, dict) or not entries:
            raise TierError(f'{where} has no tiers: give at least one, e.g. "tiers": {{"free": {{"utility": 3.0}}}}')
        tiers = {name: Tier.parse(name, entry) for name, entry in entries.items()}
        default = data.get("default")
        if default not in tiers:
            raise TierError(
                f"{where}: the default tier {json.dumps(default)} is not one of its tiers ({', '.join(tiers)}); "
                "every request without a known key gets it"
            )
        keys = data.get("keys", {})
        if not isinstance(keys, dict):
            raise TierError(f'{where}: "keys" must map "sha256:<hex>" digests to tier names')
        for digest, tier in keys.items():
            if not _DIGEST.match(str(digest)):
                raise TierError(
                    f"{where}: key entry {str(digest)[:16]!r}... is not a sha256:<64 hex digits> digest. A key is "
                    f"never stored in clear: make keys with `aim tiers key TIER --tiers FILE`"
                )
            if tier not in tiers:
                raise TierError(f"{where}: a key is given tier {json.dumps(tier)}, which is not one of {list(tiers)}")
        return cls(default, tiers, dict(keys))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TierTable:
        path = Path(path)
        if not path.is_file():
            raise TierError(f"no tiers file at {path}: write one, e.g. {EXAMPLE}")
        return cls.parse(read_json(path, TierError, f"write it as JSON, e.g. {EXAMPLE}"), str(path))

    def to_json(self) -> dict:
        return {
            "default": self.default,
            "tiers": {name: tier.to_json() for name, tier in self.tiers.items()},
            "keys": dict(self.keys),
        }

    # -- the server's side

    def tier_of(self, authorization: list[str]) -> str:
        """The tier of a request's Authorization values (the header, as Triton forwards it): a known
        `Bearer <key>` gives its key's tier, anything else the default. Two different values are
        refused: a request has one credential."""
        values = set(authorization)
        if len(values) > 1:
            raise InvalidInputError("the request carries more than one Authorization value: send one")
        if not values:
            return self.default
        scheme, _, key = values.pop().strip().partition(" ")
        if scheme.lower() != BEARER or not key.strip():
            return self.default
        return self.keys.get(key_digest(key.strip()), self.default)

    def resolved(self, calibration: dict | None) -> TierTable:
        """Every tier as a utility (sigma): a level through the build's calibration table (its
        levels -> sigmas, linearly interpolated as the calibrated engine interpolates them)."""
        tiers = {}
        for name, tier in self.tiers.items():
            if tier.level is None:
                tiers[name] = tier
                continue
            if not calibration or "levels" not in calibration or "sigmas" not in calibration:
                raise TierError(
                    f"tier {name!r} gives a calibrated level ({tier.level:g}), but this build is not calibrated: "
                    f"calibrate it (`aim calibrate`), or give the tier a utility (sigma) instead"
                )
            sigma = float(np.interp(tier.level, calibration["levels"], calibration["sigmas"]))
            tiers[name] = Tier(name, utility=sigma)
        return TierTable(self.default, tiers, dict(self.keys))

    def sigma(self, tier: str) -> float:
        utility = self.tiers[tier].utility
        if utility is None:
            raise TierError(f"tier {tier!r} has no utility: resolve the table for its build first")
        return utility


def add_key(path: str | os.PathLike, tier: str) -> str:
    """Makes a key of `tier`, records its digest in the tiers file at `path` (rewritten atomically)
    and returns the key: the only time it exists in clear on this side."""
    path = Path(path)
    with folder_lock(path.absolute().parent):  # two `aim tiers key` on one file take turns
        table = TierTable.load(path)
        if tier not in table.tiers:
            raise TierError(f"{path} has no tier {tier!r}; its tiers: {', '.join(table.tiers)}")
        key = new_key()
        data = read_json(path, TierError, "write it as JSON")
        data.setdefault("keys", {})[key_digest(key)] = tier
        TierTable.parse(data, str(path))
        mode = path.stat().st_mode & 0o777
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            os.chmod(tmp, mode)
    return key
