"""Running a build's engines once, on one set of inputs and knobs, for its checks to judge (as
Polygraphy's `Comparator.run` gives the `RunResults` that `compare_accuracy` judges): the bare engine
and the verification flavour on the reference's inputs, then the production engine as the judges'
plan asks (verify/statistics.py, verify/keyed.py) and the decode loop on the reference's prompts
(text generation: aim/generation/reference_runs.py).

The engines are any runners with `run(inputs, utility, focus, **noise)` (runtime/base.py; the stand-ins
of verify/defects.py too); each role's runner is closed once done with, so a large model's weights are
in memory once at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aim.verify.reference import Reference, tile_batch
from aim.verify.results import REFERENCE, STATISTICS, Plan, RunResults
from aim.verify.statistics import MIN_SAMPLES, statistical_checks, statistical_plan


def statistics_batch(bare, inputs: dict, bare_logits: np.ndarray, max_batch: int) -> tuple[dict, np.ndarray]:
    """The statistics' inputs and bare logits: the reference inputs, their batch tiled (up to
    `max_batch`) until one run gives MIN_SAMPLES values where it can, so small outputs need fewer runs."""
    batch = bare_logits.shape[0]
    repeats = int(np.clip(np.ceil(MIN_SAMPLES / bare_logits.size), 1, max(1, max_batch // batch)))
    if repeats == 1:
        return inputs, bare_logits
    tiled = tile_batch(inputs, repeats)
    return tiled, bare.run(tiled)


def run_plan(engine, plan: Plan, inputs: dict[str, dict], baseline: np.ndarray) -> dict[str, np.ndarray]:
    """Every run of `plan` in order, on `inputs` (STATISTICS and REFERENCE: {name: array}; an int is
    that row of the REFERENCE inputs); name -> the outputs stacked [runs, ...] (a name without runs gets
    [0, *baseline.shape])."""
    draws = {}
    for name, runs in plan.items():
        outputs = []
        for knobs in runs:
            if isinstance(knobs.inputs, int):
                feed = {key: array[knobs.inputs : knobs.inputs + 1] for key, array in inputs[REFERENCE].items()}
            else:
                feed = inputs[knobs.inputs]
            outputs.append(engine.run(feed, knobs.utility, knobs.focus))
        draws[name] = np.stack(outputs) if outputs else np.empty((0, *baseline.shape), baseline.dtype)
    return draws


def run_engines(
    bare,
    verification,
    production,
    reference: Reference,
    plan_of,
    max_batch: int,
    task_runs: Callable[[object], dict[str, np.ndarray]] | None = None,
    note: Callable[[str], None] = lambda what: None,
) -> RunResults:
    """The build's engines in turn (bare, verification, production), each closed when done but the
    production one (its caller's to close). `plan_of(bare)`: the judges' plan for the statistics batch
    whose bare logits are `bare` (keyed noise's depends on their values); `max_batch`: the largest batch
    the engines take; `task_runs(production)`: the arrays the task's checks judge (text generation:
    aim/generation/reference_runs.py); `note(what)`: told as each run starts (a 7B build's take minutes)."""
    inputs = reference.inputs
    note("bare engine on the reference inputs")
    bare_logits = bare.run(inputs)
    statistics_inputs, statistics = statistics_batch(bare, inputs, bare_logits, max_batch)
    bare.close()
    note("verification flavour (noise given) on the reference inputs")
    modulated = verification.run(
        inputs,
        reference.utility,
        reference.focus,
        noise_utility=reference.noise_utility,
        noise_focus=reference.noise_focus,
    )
    verification.close()
    plan = plan_of(statistics)
    note(f"production engine: {sum(len(runs) for runs in plan.values())} runs for the statistical checks")
    draws = run_plan(production, plan, {STATISTICS: statistics_inputs, REFERENCE: inputs}, statistics)
    if task_runs is not None:
        note("production engine: the task's own runs (text: the decode loop on the reference prompts)")
    return RunResults(bare_logits, modulated, statistics, plan, draws, task_runs(production) if task_runs else {})


def run_statistical_checks(engine, inputs: dict, bare: np.ndarray, class_axis: int, seed: int = 0):
    """The statistical checks of a production engine on `inputs` whose bare logits are `bare`: its runs
    of the judges' plan, then the verdicts (benchmarks and tests; a build runs them in run_engines)."""
    draws = run_plan(engine, statistical_plan(bare.shape, class_axis), {STATISTICS: inputs}, bare)
    return statistical_checks(draws, bare, class_axis, seed)


def run_keyed_checks(
    engine, inputs: dict, bare: np.ndarray, class_axis: int, reference: Reference, tolerance, fp16: bool = False
):
    """The keyed checks of a keyed production engine on `inputs` whose bare logits are `bare`, against
    `reference` (its keyed_modulated: the twin's answer): its runs of the judges' plan, then the verdicts."""
    from aim.verify.keyed import keyed_checks, keyed_plan

    plan = keyed_plan(bare, class_axis, reference, fp16)
    draws = run_plan(engine, plan, {STATISTICS: inputs, REFERENCE: reference.inputs}, bare)
    return keyed_checks(draws, bare, class_axis, reference, tolerance, fp16)
