"""Timing that survives a busy machine: variants run round-robin, one run of each per round, so that
a load hits a round's runs alike and a figure can be paired within the round (confidence.py)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np

# After a PyTorch run: its OpenMP threads spin for a while after a call and would slow whichever
# variant runs next. An untimed pause longer than their spin lets them sleep first.
SETTLE_S = 0.02
THREADS = 2  # ONNX Runtime intra-op threads and torch threads: the machine's cores


def quiet_engine(path, profile: dict | None = None, memory_pattern: bool | None = None):
    """An ONNX Runtime engine whose idle threads do not spin: variants run round-robin from several
    sessions, and a session's spinning pool would slow down whichever variant runs after it.
    `memory_pattern`: as OnnxRuntimeEngine's (None: the engine's rule)."""
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(path, THREADS, spinning=False, profile=profile, memory_pattern=memory_pattern)


class Rounds:
    """Interleaved runs of `variants` ({name: run()}), in milliseconds per round. Round i starts at
    the i-th variant and goes round the list, so that no variant always runs first or always follows
    the same one. The garbage collector waits until a round is over (as timeit has it), so that one
    variant's garbage is not collected on another's time. `settle`: the variants after which to
    pause (PyTorch's); `before_round(i)`: called before round i (e.g. to take the round's prompt)."""

    def __init__(
        self,
        variants: dict[str, Callable[[], object]],
        warmup: int = 2,
        settle: tuple[str, ...] = (),
        before_round: Callable[[int], None] | None = None,
    ):
        self.variants, self.settle, self.before_round = variants, settle, before_round
        self.samples: dict[str, list[float]] = {name: [] for name in variants}
        self.count = 0
        for i in range(warmup):
            self._round(-1 - i, timed=False)

    def _round(self, index: int, timed: bool = True) -> None:
        if self.before_round is not None:
            self.before_round(index)
        names = list(self.variants)
        start_at = index % len(names)
        gc.collect()
        gc.disable()
        try:
            for name in names[start_at:] + names[:start_at]:
                start = time.perf_counter()
                self.variants[name]()
                elapsed = (time.perf_counter() - start) * 1e3
                if timed:
                    self.samples[name].append(elapsed)
                if name in self.settle:
                    time.sleep(SETTLE_S)
        finally:
            gc.enable()

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self._round(self.count)
            self.count += 1

    def times(self) -> dict[str, np.ndarray]:
        return {name: np.asarray(values) for name, values in self.samples.items()}
