"""Peak resident memory of this process, step by step (Linux): the kernel's high-water mark (VmHWM in
/proc/self/status), which writing 5 to /proc/self/clear_refs resets, so that each step of a build
reports its own peak. Elsewhere both return None and the build records no figures."""

from __future__ import annotations

import re

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def _status(field: str) -> int | None:
    try:
        with open(_STATUS) as status:
            found = re.search(rf"^{field}:\s*(\d+) kB", status.read(), re.MULTILINE)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def peak_rss() -> int | None:
    """Bytes: the most this process has had resident since it started or since reset_peak()."""
    return _status("VmHWM")


def rss() -> int | None:
    """Bytes resident now."""
    return _status("VmRSS")


def reset_peak() -> bool:
    """Starts a new high-water mark at the current resident size; False where the kernel does not allow it."""
    try:
        with open(_CLEAR, "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False
