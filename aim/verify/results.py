"""What a build's engines answered, as data: the judges (verify/judges.py, statistics.py, keyed.py, and
the tasks' own checks) take these arrays and return verdicts; none of them runs an engine.

Running is the pipeline's (pipeline/engine_runs.py), as in Polygraphy, whose `Comparator.run` returns
`RunResults` that `Comparator.compare_accuracy` judges. A judge states what it needs run as a `Plan`:
named lists of `Knobs`, one per run of the production engine, in the order they run (an engine's
random stream is consumed in that order, so a seed reproduces every draw).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STATISTICS = "statistics"  # the statistics batch: the reference inputs, their batch tiled (engine_runs.py)
REFERENCE = "reference"  # the reference inputs as they are


@dataclass(frozen=True)
class Knobs:
    """One run of the production engine: `utility` (a number or [B]), `focus` (None, [C] or [B, C]) and
    its inputs: STATISTICS, REFERENCE, or an int, that row of the reference inputs alone."""

    utility: float | np.ndarray = 0.0
    focus: np.ndarray | None = None
    inputs: str | int = STATISTICS


Plan = dict[str, list[Knobs]]  # what a judge needs run: name -> its runs, run in this order


@dataclass
class RunResults:
    """Every array a build's checks judge, from one run of its engines on one set of inputs and knobs:

    bare          the bare engine on the reference inputs
    verification  the verification flavour on the reference inputs, knobs and noise
    statistics    the bare engine on the statistics batch (the production runs' baseline)
    plan, draws   the production engine's runs (Knobs) and what each gave, stacked [runs, ...] by name
    task          the arrays the task's own checks judge (text generation: the decode loop's tokens, or
                  its logits along PyTorch's tokens, and the KV cache's logits beside a full recompute)
    """

    bare: np.ndarray
    verification: np.ndarray
    statistics: np.ndarray
    plan: Plan
    draws: dict[str, np.ndarray]
    task: dict[str, np.ndarray] = field(default_factory=dict)
