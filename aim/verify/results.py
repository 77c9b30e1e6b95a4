"""What a build's engines answered, as data: the judges (verify/judges.py, statistics.py, keyed.py, and
the tasks' own checks) take these arrays and return verdicts; none of them runs an engine.

Running is the pipeline's (pipeline/engine_runs.py), as in Polygraphy, whose `Comparator.run` returns
`RunResults` that `Comparator.compare_accuracy` judges. A judge states what it needs run as a `Plan`:
named lists of `Knobs`, one per run of the production engine, in the order they run (an engine's
random stream is consumed in that order, so a seed reproduces every draw). A task states the decodes
it needs as `Greedy` and `CacheVsRecompute` runs.
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


@dataclass(frozen=True)
class Greedy:
    """Greedy decoding by the production engine at utility 0: `new_tokens` tokens after the prompts
    (`input_ids`, `attention_mask`, left-padded), stopping a row at a stop token; with `forced`, the
    tokens fed back are those (teacher forcing) and every step's logits are kept."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    new_tokens: int
    stop_tokens: np.ndarray
    pad_token_id: int
    forced: np.ndarray | None = None


@dataclass(frozen=True)
class CacheVsRecompute:
    """`steps` greedy steps after the prompts, each step's logits through the KV cache beside those of
    a full recompute of the sequence so far."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    steps: int


@dataclass
class RunResults:
    """Every array a build's checks judge, from one run of its engines on one set of inputs and knobs:

    bare          the bare engine on the reference inputs
    verification  the verification flavour on the reference inputs, knobs and noise
    statistics    the bare engine on the statistics batch (the production runs' baseline)
    plan, draws   the production engine's runs (Knobs) and what each gave, stacked [runs, ...] by name
    decodes       the task's decodes by name and array: "<name>.tokens", "<name>.logits" (Greedy),
                  "<name>.cached", "<name>.recomputed" (CacheVsRecompute)
    """

    bare: np.ndarray
    verification: np.ndarray
    statistics: np.ndarray
    plan: Plan
    draws: dict[str, np.ndarray]
    decodes: dict[str, np.ndarray] = field(default_factory=dict)
