"""What a build is asked to make, whatever it is made from: `BuildRequest`.

A request is checked (`resolve`) before anything is written: the precision is known, the noise and
its key file agree, and the backend can work here (`auto` picks one). The same request decides
whether an existing build may be reused (pipeline/builder.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from aim.contract import NOISE_SOURCES
from aim.errors import AimError
from aim.graph_passes.noise_key import NoiseKey
from aim.runtime.backends import choose_backend

PRECISIONS = ("fp32", "fp16", "int4", "int8")
QUANTIZED = ("int4", "int8")  # weight-only, MatMulNBits: ONNX Runtime engines (graph_passes/quantize.py)


@dataclass(frozen=True)
class BuildRequest:
    """Where and how to build: OUT (the build goes to OUT/<the source's name>/), the backend, the
    precision, the production noise ("fresh", or "keyed" by the key in file `key`, written there once the
    build passes if it does not exist yet), the seed of everything random, and the engine profile's
    largest batch (None: a default that serves, pipeline/batch.py)."""

    out: str | os.PathLike = "build"
    backend: str = "onnxruntime"
    precision: str = "fp32"
    noise: str = "fresh"
    key: str | os.PathLike | None = None
    seed: int = 0
    max_batch: int | None = None

    def resolve(self) -> Resolved:
        """The request checked, with its backend chosen and its noise key read (or drawn); a bad
        precision, noise, key file, batch or backend fails here, before anything is written."""
        if self.precision not in PRECISIONS:
            raise AimError(f"unknown precision {self.precision!r}; available: {', '.join(PRECISIONS)}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or int(self.max_batch) < 1):
            raise AimError(f"the largest batch must be at least 1 (--max-batch, MAX_BATCH=); got {self.max_batch}")
        key, fresh_key = noise_key_of(self.noise, self.key)
        if self.precision in QUANTIZED and self.backend != "onnxruntime":
            if self.backend != "auto":
                raise AimError(
                    f"PRECISION={self.precision} makes an ONNX Runtime engine (its weights in MatMulNBits, which "
                    f"TensorRT cannot parse): use BACKEND=onnxruntime (or auto), or PRECISION=fp16 for {self.backend}"
                )
            return Resolved(
                self, "onnxruntime", f"onnxruntime: {self.precision} engines are ONNX Runtime's", key, fresh_key
            )
        backend, why = choose_backend(self.backend)  # one that cannot work fails here, with what to install
        return Resolved(self, backend, why, key, fresh_key)


@dataclass(frozen=True)
class Resolved:
    """A checked request: the backend chosen (and why), the noise key (None for fresh noise) and whether
    it was drawn now rather than read from the request's key file."""

    request: BuildRequest
    backend: str
    why: str
    key: NoiseKey | None = field(repr=False)
    fresh_key: bool

    @property
    def out(self) -> Path:
        return Path(self.request.out)

    @property
    def precision(self) -> str:
        return self.request.precision

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def max_batch(self) -> int | None:
        return self.request.max_batch

    def noise_line(self) -> str | None:
        """The log's line on keyed noise: which key, and where it is kept."""
        if self.key is None:
            return None
        file = self.request.key
        return (
            "noise keyed: "
            + (f"the key in {file}" if not self.fresh_key else "a fresh key from the OS random source")
            + (f", saved to {file} (mode 600) if the build passes" if self.fresh_key and file else "")
            + (", kept only inside the engine" if file is None else "")
            + f"; fingerprint {self.key.fingerprint}"
        )


def noise_key_of(noise: str, noise_key) -> tuple[NoiseKey | None, bool]:
    """The noise key of a build or a modulated graph (None for fresh noise), and whether it was drawn
    now rather than read from the file `noise_key`; a bad combination or key file fails here."""
    if noise not in NOISE_SOURCES:
        raise AimError(f"unknown noise {noise!r}; available: {', '.join(NOISE_SOURCES)}")
    if noise_key is not None and noise != "keyed":
        raise AimError("a noise key (--noise-key) is for keyed noise: add --noise keyed (NOISE=keyed), or drop the key")
    return NoiseKey.load_or_draw(noise_key) if noise == "keyed" else (None, False)
