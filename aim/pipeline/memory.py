"""Peak resident memory of each step of a build (Linux), measured without touching the process's own
high-water mark, so that `/usr/bin/time` and getrusage still see the true peak of the whole run.

A step's peak is the kernel's high-water mark (VmHWM in /proc/self/status) where the step raised it
(then it is exact), else the largest resident size (VmRSS) a thread sampled every INTERVAL seconds
during the step (a spike shorter than that may be missed; the step then reads low, never high).
Elsewhere every figure is None and the build records none.
"""

from __future__ import annotations

import re
import threading

_STATUS = "/proc/self/status"
INTERVAL = 0.01  # seconds between two samples of the resident size


def _status(field: str) -> int | None:
    try:
        with open(_STATUS) as status:
            found = re.search(rf"^{field}:\s*(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def peak_rss() -> int | None:
    """Bytes: the most this process has had resident since it started (the kernel's VmHWM)."""
    return _status("VmHWM")


def rss() -> int | None:
    """Bytes resident now."""
    return _status("VmRSS")


class StepPeak:
    """The resident memory of one step, from its start to `stop()`: (start, peak) in bytes, or None
    where /proc is not there. A context manager; the sampling thread ends with the step."""

    def __init__(self):
        self.start, self.high_water = rss(), peak_rss()
        self.sampled = self.start
        self._done = threading.Event()
        self._thread = None
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, name="aim-memory", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(INTERVAL):
            now = rss()
            if now is not None and now > self.sampled:
                self.sampled = now

    def stop(self) -> tuple[int, int] | None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.start is None:
            return None
        now, high_water = rss(), peak_rss()
        peak = max(self.sampled, self.start, now or 0)
        if high_water is not None and self.high_water is not None and high_water > self.high_water:
            peak = max(peak, high_water)  # the step set the process's new high: exact
        return self.start, peak

    def __enter__(self) -> StepPeak:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
