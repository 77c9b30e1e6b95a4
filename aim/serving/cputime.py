"""CPU time of a process and its children (Linux /proc): what a run cost, however busy the machine.

Wall-clock throughput on a shared machine moves with everyone else's load; the CPU seconds the
server's processes spend per request move far less, so the load test reports both. The Triton server
runs its Python backend stubs as child processes, one per model instance: they are counted too.
"""

from __future__ import annotations

import os
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:  # gone, or not Linux
        return None
    return text[text.rindex(")") + 2 :].split()  # fields after the command name, which may hold spaces


def tree_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of `pid` and its living children, or None where /proc is missing."""
    own = _stat(pid)
    if own is None:
        return None
    total = int(own[11]) + int(own[12])  # utime, stime (fields 14, 15 of proc(5))
    for entry in PROC.iterdir():
        if entry.name.isdigit() and entry.name != str(pid):
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid):  # ppid (field 4)
                total += int(fields[11]) + int(fields[12])
    return total / TICKS
