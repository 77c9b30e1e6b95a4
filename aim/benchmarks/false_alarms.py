"""python -m aim.benchmarks.false_alarms build/llama [--repeats 1000] [--defect-repeats 100]

The statistical checks' two error rates, measured on a build (`make false-alarms MODEL=x`; minutes,
not part of the test suite):

- false alarms: the checks of the build's production engine, `--repeats` times, each time with ONNX
  Runtime seeded (another seed each time) before a new session exists, on the inputs `make engine`
  uses. A correct engine should fail none (the stated rate is <= FALSE_FAILURE_RATE per build). Each
  check's Kolmogorov-Smirnov p-values over the repeats should be uniform: their own KS test says so.
- misses: the same checks on stand-ins with each known defect (aim/verify/defects.py), with the
  build's logits, `--defect-repeats` times each: the check meant to catch a defect must fail every time.

Writes <build>/false_alarms.json (beside the build, not one of its recorded artifacts).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from aim.contract import BATCH
from aim.errors import AimError
from aim.files import atomic_path
from aim.layout import REFERENCE
from aim.pipeline.engine_runs import run_statistical_checks, statistics_batch
from aim.runtime.folder import Build
from aim.verify.defects import DEFECTS, DefectiveEngine
from aim.verify.reference import Reference
from aim.verify.statistics import ALPHA, FALSE_FAILURE_RATE

RESULT = "false_alarms.json"


def _statistics_setup(folder):
    """(build, inputs, bare logits, class axis) of a build, as `make engine`'s statistics use them."""
    build = Build.open(folder)
    manifest = build.manifest
    reference = Reference.load(manifest.folder / REFERENCE)
    with build.runner("bare", "onnxruntime") as bare:
        inputs, logits = statistics_batch(
            bare, reference.inputs, bare.run(reference.inputs), manifest.dynamic_dims[BATCH].max
        )
    return build, inputs, logits, manifest.modulation.class_axis


def _uniform_under_null(check) -> dict[str, float]:
    """The p-values inside a check that are uniform for a correct engine (the check's own is a
    Bonferroni minimum, which is not): their uniformity over many seeds tests the tests themselves."""
    from scipy import stats

    metrics = check.metrics
    if "ks_p_value" in metrics:
        return {
            "KS": metrics["ks_p_value"],
            "mean z": float(2 * stats.norm.sf(abs(metrics["mean_z"]))),
            "variance z": float(2 * stats.norm.sf(abs(metrics["variance_z"]))),
        }
    return {f"r at {tuple(n['offset'])}": float(2 * stats.norm.sf(abs(n["z"]))) for n in metrics.get("neighbours", [])}


def false_alarms(folder, repeats: int, first_seed: int = 1, log=print) -> dict:
    """The checks of the build's production engine (ONNX Runtime) under `repeats` seeds."""
    import onnxruntime
    from scipy import stats

    build, inputs, logits, axis = _statistics_setup(folder)
    failures, p_values, started = [], {}, time.perf_counter()
    for seed in range(first_seed, first_seed + repeats):
        onnxruntime.set_seed(seed)  # before the session exists: it seeds only sessions made after it
        with build.runner("production", "onnxruntime") as engine:
            checks = run_statistical_checks(engine, inputs, logits, axis, seed)
        failed = [check.name for check in checks if not check.passed]
        if failed:
            failures.append({"seed": seed, "failed": failed})
        for check in checks:
            for test, p in _uniform_under_null(check).items():
                p_values.setdefault(f"{check.name}: {test}", []).append(p)
        done = seed - first_seed + 1
        if done % 50 == 0 or done == repeats:
            log(f"  {done}/{repeats} repeats, {len(failures)} failed, {time.perf_counter() - started:.0f} s")
    uniform = {
        name: {"smallest_p": float(min(values)), "uniformity_ks_p": float(stats.kstest(values, "uniform").pvalue)}
        for name, values in p_values.items()
    }
    return {
        "repeats": repeats,
        "seeds": [first_seed, first_seed + repeats - 1],
        "values_per_run": int(logits.size),
        "failed_builds": len(failures),
        "failures": failures,
        "stated_false_failure_rate": FALSE_FAILURE_RATE,
        "alpha_per_check": ALPHA,
        "p_values": uniform,
        "seconds": round(time.perf_counter() - started, 1),
    }


def misses(folder, repeats: int, log=print) -> dict:
    """Each defect's stand-in, `repeats` seeds: how often the check meant to catch it passed."""
    _, inputs, logits, axis = _statistics_setup(folder)
    found = {}
    for defect, (what, caught_by) in DEFECTS.items():
        missed = 0
        for seed in range(repeats):
            checks = {
                c.name: c.passed
                for c in run_statistical_checks(DefectiveEngine(logits, axis, defect, seed), inputs, logits, axis, seed)
            }
            if caught_by is None:
                missed += not all(checks.values())  # the defect-free stand-in: a false alarm
            else:
                missed += checks[caught_by]
        found[defect] = {
            "what": what,
            "caught_by": caught_by,
            "repeats": repeats,
            "missed" if caught_by else "false_alarms": missed,
        }
        log(
            f"  {defect:13} {what}: "
            + (f"{caught_by!r} missed it {missed}/{repeats}" if caught_by else f"{missed}/{repeats} false alarms")
        )
    return found


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m aim.benchmarks.false_alarms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="a build folder (make engine), e.g. build/llama")
    parser.add_argument("--repeats", type=int, default=1000, help="repeated verdicts of the real engine (default 1000)")
    parser.add_argument("--defect-repeats", type=int, default=100, help="repeats per defect stand-in (default 100)")
    parser.add_argument("--first-seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.defect_repeats < 0:
        parser.error("--repeats must be >= 1 and --defect-repeats >= 0")
    Build.open(args.folder)  # no build there, or a changed one: fails before anything runs
    print(f"{args.folder}: statistical checks of the production engine, {args.repeats} seeds")
    result = {"build": str(args.folder), "engine": false_alarms(args.folder, args.repeats, args.first_seed)}
    print(f"{args.folder}: defect stand-ins, {args.defect_repeats} seeds each")
    result["defects"] = misses(args.folder, args.defect_repeats)
    engine = result["engine"]
    print(
        f"false alarms: {engine['failed_builds']}/{engine['repeats']} repeated verdicts failed (stated rate <= "
        f"{FALSE_FAILURE_RATE:g} per build); misses: "
        + ", ".join(f"{d} {r['missed']}/{r['repeats']}" for d, r in result["defects"].items() if r["caught_by"])
    )
    with atomic_path(args.folder / RESULT) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.folder / RESULT}")
    return result


if __name__ == "__main__":
    try:
        main()
    except AimError as error:  # no build there, or a changed one: say so, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
