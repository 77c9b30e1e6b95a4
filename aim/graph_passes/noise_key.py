"""The secret behind keyed noise: a 32-byte key from the OS's random source, the constants a keyed
graph derives from it, and its fingerprint (the only trace of it the manifest keeps).

The key itself never enters a graph or a build folder: the graph holds only constants derived from
it by SHAKE-256 (hashlib), one domain label per constant, so a key file rebuilds an engine that
answers every request exactly as before, on any numpy. `--noise-key FILE` keeps the key in FILE
(written, mode 600, by the first build that succeeds with it); without it the key lives only inside
the engine.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.files import atomic_path

KEY_BYTES = 32
# Largest prime below 2**30 with PRIME % 3 == 2: then x -> x**3 permutes Z_p (gcd(3, p - 1) = 1), and
# every product of two values below 2 * PRIME fits in int64 (TensorRT has no bitwise operators, so
# the generator is int64 Mul, Add and Mod only).
PRIME = 1_073_741_789
# Coordinates of the digest: keyed +-1 projections of the pooled, centred logits. Four keep a 32,000-token
# vocabulary's projection at 512 KB (FP32 once ONNX Runtime folds its FP16 storage); a perturbation's
# chance to move the digest grows with their number, a distinct request's chance to share it shrinks.
PROJECTIONS = 4
CLASS_ROUNDS = 3  # cubings of a class (or position) counter with the row's seed
ABSORB_ROUNDS = 2  # cubings per word absorbed into the row's seed


class NoiseKeyError(AimError):
    """A key file that cannot be read, or is not a key."""


@dataclass(frozen=True)
class KeyedConstants:
    """What a keyed graph holds (numpy), all derived from the key."""

    projection: np.ndarray  # float16 [C, PROJECTIONS] of +-1 (exact in FP16: half the bytes of FP32)
    offsets: np.ndarray  # float32 [PROJECTIONS] in [0, 1): the quantization grid's secret phase
    absorb: np.ndarray  # int64 [PROJECTIONS + 2]: the seed's start, then one per absorbed word
    # The counter of class slot j is (j * multiplier + offset) mod PRIME: n1 takes slots 0 .. C'-1
    # (C' = C rounded up to even), n2 slots C' + c and C' + C + c for its two uniforms of class c.
    class_multiplier: int
    class_offset: int
    class_rounds: np.ndarray  # int64 [CLASS_ROUNDS - 1]
    class_start: int  # smooth keyed noise: the key's own hash of a slot starts from this
    position_multiplier: int  # position counter = (index * multiplier + offset) mod PRIME
    position_offset: int
    position_rounds: np.ndarray  # int64 [CLASS_ROUNDS - 1]


@dataclass(frozen=True)
class NoiseKey:
    secret: bytes

    def __post_init__(self):
        if len(self.secret) != KEY_BYTES:
            raise NoiseKeyError(f"a noise key has {KEY_BYTES} bytes, got {len(self.secret)}")

    @classmethod
    def draw(cls) -> NoiseKey:
        """A fresh key from the OS's random source."""
        return cls(secrets.token_bytes(KEY_BYTES))

    @property
    def fingerprint(self) -> str:
        """16 hex digits that identify the key without revealing it (the manifest records this)."""
        return hashlib.sha256(b"aim-noise-key fingerprint\0" + self.secret).hexdigest()[:16]

    # -- the key file: 64 hex digits and a newline

    @classmethod
    def read(cls, path: str | os.PathLike) -> NoiseKey:
        path = Path(path)
        try:
            text = path.read_text().strip()
            secret = bytes.fromhex(text)
        except (OSError, UnicodeDecodeError) as error:
            raise NoiseKeyError(f"cannot read the noise key {path}: {error}") from None
        except ValueError:
            raise NoiseKeyError(
                f"{path} is not a noise key: it must hold {2 * KEY_BYTES} hex digits (e.g. from `aim engine "
                f"--noise-key {path}`, which creates it)"
            ) from None
        if len(secret) != KEY_BYTES:
            raise NoiseKeyError(
                f"{path} is not a noise key: it holds {len(secret)} bytes, a key has {KEY_BYTES} "
                f"({2 * KEY_BYTES} hex digits)"
            )
        return cls(secret)

    def write(self, path: str | os.PathLike) -> Path:
        """Writes the key, readable by its owner only, atomically (a killed write leaves no half key)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(handle, "w") as out:
                out.write(self.secret.hex() + "\n")
        return path

    @classmethod
    def load_or_draw(cls, path: str | os.PathLike | None) -> tuple[NoiseKey, bool]:
        """The key in `path` if that file exists, else a fresh one; and whether it is fresh (the
        caller writes a fresh key to `path` once what it built with it has succeeded)."""
        if path is not None and Path(path).exists():
            return cls.read(path), False
        return cls.draw(), True

    # -- the constants of a keyed graph

    def _stream(self, label: str, size: int) -> bytes:
        return hashlib.shake_256(b"aim-noise-key " + label.encode() + b"\0" + self.secret).digest(size)

    def _residues(self, label: str, count: int, low: int = 0) -> np.ndarray:
        """`count` integers in [low, PRIME), from 8 bytes each (the modulo bias is below 2**-33)."""
        raw = np.frombuffer(self._stream(label, 8 * count), dtype="<u8")
        return (low + raw % np.uint64(PRIME - low)).astype(np.int64)

    def constants(self, num_classes: int) -> KeyedConstants:
        bits = np.unpackbits(
            np.frombuffer(self._stream("projection", (num_classes * PROJECTIONS + 7) // 8), dtype=np.uint8)
        )
        signs = bits[: num_classes * PROJECTIONS].reshape(num_classes, PROJECTIONS)
        offsets = (np.frombuffer(self._stream("offsets", 4 * PROJECTIONS), dtype="<u4") >> 8) / 2.0**24  # exact in FP32
        multiplier, offset = self._residues("class counters", 2, low=1)
        position_multiplier, position_offset = self._residues("position counters", 2, low=1)
        return KeyedConstants(
            projection=np.where(signs == 1, 1.0, -1.0).astype(np.float16),
            offsets=offsets.astype(np.float32),
            absorb=self._residues("absorb", PROJECTIONS + 2),
            class_multiplier=int(multiplier),
            class_offset=int(offset),
            class_rounds=self._residues("class rounds", CLASS_ROUNDS - 1),
            class_start=int(self._residues("class start", 1)[0]),
            position_multiplier=int(position_multiplier),
            position_offset=int(position_offset),
            position_rounds=self._residues("position rounds", CLASS_ROUNDS - 1),
        )
