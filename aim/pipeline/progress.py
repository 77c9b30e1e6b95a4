"""The numbered steps of a build on its log, each with its wall time and resident memory (at its start,
its peak, and its peak of anonymous memory: pipeline/memory.py), kept for the manifest's timings_s and memory_mb."""

from __future__ import annotations

import time
from collections.abc import Callable

from aim.pipeline.memory import StepPeak


class Progress:
    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.step, self.log = total, 0, log
        self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.memory: dict[str, dict[str, float]] = {}
        self._peak: StepPeak | None = None

    def __call__(self, what: str) -> None:
        """A step starts: its number and what it does."""
        self.close()
        self.step += 1
        self.last = time.perf_counter()
        self._peak = StepPeak()
        self.log(f"[{self.step}/{self.total}] {what}")

    def done(self, key: str, detail: str = "") -> None:
        """The step ends: its time, its memory and what it made."""
        now = time.perf_counter()
        self.timings[key] = round(now - self.last, 3)
        self.last = now
        measured, note = self._peak.stop() if self._peak else None, ""
        self._anonymous = self._peak.anonymous if self._peak else None
        self._peak = None
        if measured is not None:
            start, peak = measured
            self.memory[key] = {"start": round(start / 1e6, 1), "peak": round(peak / 1e6, 1)}
            anonymous = self._anonymous
            if anonymous is not None:  # what the step held of its own (VmRSS counts mapped weights too)
                self.memory[key]["anonymous"] = round(anonymous / 1e6, 1)
            note = f", peak {peak / 1e9:.2f} GB resident (+{(peak - start) / 1e9:.2f} GB" + (
                f"; {anonymous / 1e9:.2f} GB anonymous)" if anonymous is not None else ")"
            )
        self.log(f"      done in {self.timings[key]:.1f} s{note}{': ' + detail if detail else ''}")

    def note(self, what: str) -> None:
        """A long step's progress: what it starts now, and the time since the step began."""
        self.log(f"      {time.perf_counter() - self.last:6.0f} s  {what}")

    def close(self) -> None:
        """Stops the sampling of a step that ended without done() (an error)."""
        if self._peak is not None:
            self._peak.stop()
            self._peak = None
