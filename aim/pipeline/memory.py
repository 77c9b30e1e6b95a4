"""Peak resident memory of each step of a build (Linux), measured without touching the process's own
high-water mark, so that `/usr/bin/time` and getrusage still see the true peak of the whole run.

A step's peak is the kernel's high-water mark (VmHWM in /proc/self/status) where the step raised it
(then it is exact), else the largest resident size (VmRSS) a thread sampled every INTERVAL seconds
during the step (a spike shorter than that may be missed; the step then reads low, never high).
Beside it, the largest anonymous resident memory sampled (RssAnon): VmRSS also counts the pages of
mapped files (a checkpoint's safetensors, external weights), which the kernel may evict and share,
so a build that maps 14 GB of weights reads 14 GB resident although it holds little of its own.
Elsewhere every figure is None and the build records none.

`machine_memory` is what a build may use at most: the machine's memory, or a cgroup's limit below it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

_STATUS = "/proc/self/status"
INTERVAL = 0.01  # seconds between two samples of the resident size
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _status(*fields: str) -> list[int | None]:
    try:
        with open(_STATUS) as status:
            text = status.read()
    except OSError:
        return [None] * len(fields)
    found = [re.search(rf"^{field}:\s*(\d+) kB", text, re.MULTILINE) for field in fields]
    return [int(match.group(1)) * 1024 if match else None for match in found]


def peak_rss() -> int | None:
    """Bytes: the most this process has had resident since it started (the kernel's VmHWM)."""
    return _status("VmHWM")[0]


def rss() -> int | None:
    """Bytes resident now."""
    return _status("VmRSS")[0]


def anonymous_rss() -> int | None:
    """Bytes resident now that belong to no file (RssAnon): what the process cannot give back."""
    return _status("RssAnon")[0]


def machine_memory() -> int | None:
    """Bytes of memory this process may use at most: MemTotal, or its cgroup's limit if lower; None
    where neither is readable."""
    sizes = []
    try:
        found = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
        if found:
            sizes.append(int(found.group(1)) * 1024)
    except OSError:
        pass
    for limit in _CGROUP_LIMITS:
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max", or a huge number: no limit
            sizes.append(int(text))
    return min(sizes) if sizes else None


class StepPeak:
    """The resident memory of one step, from its start to `stop()`: (start, peak) in bytes, or None
    where /proc is not there; `anonymous`, the most anonymous memory sampled (RssAnon). A context
    manager; the sampling thread ends with the step."""

    def __init__(self):
        self.start, self.high_water = rss(), peak_rss()
        self.sampled = self.start
        self.anonymous = anonymous_rss()
        self._done = threading.Event()
        self._thread = None
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, name="aim-memory", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(INTERVAL):
            now, anonymous = _status("VmRSS", "RssAnon")
            if now is not None and now > self.sampled:
                self.sampled = now
            if anonymous is not None and anonymous > (self.anonymous or 0):
                self.anonymous = anonymous

    def stop(self) -> tuple[int, int] | None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self.start is None:
            return None
        (now, high_water), anonymous = _status("VmRSS", "VmHWM"), anonymous_rss()
        if anonymous is not None:
            self.anonymous = max(self.anonymous or 0, anonymous)
        peak = max(self.sampled, self.start, now or 0)
        if high_water is not None and self.high_water is not None and high_water > self.high_water:
            peak = max(peak, high_water)  # the step set the process's new high: exact
        return self.start, peak

    def __enter__(self) -> StepPeak:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
