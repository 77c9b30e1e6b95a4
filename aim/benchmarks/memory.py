"""Peak resident memory of a process that runs an engine, modulated over bare, with its interval.

Each measurement is a fresh process that loads one engine, runs it three times (a run's memory can grow
on the second: ONNX Runtime's memory pattern) and reports its VmHWM; one round measures every variant
once, in turn, and a ratio is paired within the round (confidence.py), like the latency figures.

Two ways to open an engine, hence two ratios (docs/results.md, "SegFormer's peak RSS"):
- as we ship it: OnnxRuntimeEngine, the session options of `aim run` and the Triton front (for a model
  whose output is a map, without ONNX Runtime's memory pattern: runtime/onnxruntime.MAP_RANK);
- as a user runs the bare model: onnxruntime.InferenceSession with its default options (only the
  threads set, as every variant), importing nothing of ours.
The headline, PEAK_RSS, is the shipped modulated engine over the bare model as a user runs it;
PEAK_RSS_SAME holds both to the shipped options, so that it shows what the graph itself adds.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from aim.benchmarks import figures as names
from aim.benchmarks.confidence import BUDGET, Budget, Figure, ratio, resolve
from aim.benchmarks.timing import THREADS

# VmHWM, not getrusage: ru_maxrss survives exec, so a child would report the benchmark's own peak.
_PEAK_RSS = """
import re, sys
import numpy as np
path, feed, threads, session = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if session == "default":
    import onnxruntime as ort
    options = ort.SessionOptions(); options.intra_op_num_threads = threads; options.log_severity_level = 3
    run = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]).run
else:
    from aim.runtime.onnxruntime import OnnxRuntimeEngine
    run = OnnxRuntimeEngine(path, threads).session.run
feed = dict(np.load(feed))
for _ in range(3):
    run(None, feed)
print(int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024)
"""
DEFAULT_SESSION = ", ONNX Runtime's default session"
# name: (engine, feed, how the process opens it)
VARIANTS = {
    "bare" + DEFAULT_SESSION: ("bare", "bare", "default"),
    "bare": ("bare", "bare", "engine"),
    "modulated": ("production", "noisy", "engine"),
    "modulated" + DEFAULT_SESSION: ("production", "noisy", "default"),
}
FIGURES = [
    Figure(names.PEAK_RSS, ratio("modulated", "bare" + DEFAULT_SESSION), names.TARGETS[names.PEAK_RSS]),
    Figure(names.PEAK_RSS_SAME, ratio("modulated", "bare"), names.TARGETS[names.PEAK_RSS_SAME]),
    Figure(names.PEAK_RSS_DEFAULT, ratio("modulated" + DEFAULT_SESSION, "bare" + DEFAULT_SESSION)),
]


class PeakRounds:
    """Rounds of fresh processes, one per variant, in turn (as timing.Rounds): peak bytes per round."""

    def __init__(self, engines: dict[str, Path], feeds: dict[str, Path]):
        self.engines, self.feeds = engines, feeds
        self.samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
        self.count = 0

    def _peak(self, name: str) -> int:
        engine, feed, session = VARIANTS[name]
        command = [sys.executable, "-c", _PEAK_RSS, str(self.engines[engine]), str(self.feeds[feed]), str(THREADS)]
        out = subprocess.run([*command, session], check=True, capture_output=True, text=True)
        return int(out.stdout.strip().splitlines()[-1])

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            order = list(VARIANTS)
            start = self.count % len(order)
            for name in order[start:] + order[:start]:
                self.samples[name].append(float(self._peak(name)))
            self.count += 1

    def times(self) -> dict[str, np.ndarray]:  # the name resolve() reads; bytes here
        return {name: np.asarray(values) for name, values in self.samples.items()}


def peak_memory(
    paths: dict, noisy_feed: dict, inputs: dict, folder: Path, rounds: int, budget: Budget = BUDGET
) -> dict:
    """The peak-memory figures over `rounds` rounds (more while a target is unresolved, within `budget`),
    and each variant's median peak in bytes."""
    feeds = {"bare": folder / "feed.bare.npz", "noisy": folder / "feed.noisy.npz"}
    np.savez(feeds["bare"], **inputs)
    np.savez(feeds["noisy"], **noisy_feed)
    peaks = PeakRounds(paths, feeds)
    found = resolve(peaks, FIGURES, rounds, budget)
    medians = {name: int(np.median(values)) for name, values in peaks.times().items()}
    return {
        "figures": found["figures"],
        "pairs": found["pairs"],
        "peak_rss_bytes": medians,
        "sessions": {name: session for name, (_, _, session) in VARIANTS.items()},
    }
