"""The verification of a build: its engines run once (pipeline/engine_runs.py), then the judges
(verify/judges.py and the task's own checks) decide on the arrays; and `aim verify`, which re-runs
the checks of an existing build against its stored reference (no PyTorch needed)."""

from __future__ import annotations

import os
from datetime import datetime, timezone

from aim.contract import BATCH
from aim.generation.reference_runs import generation_runs
from aim.layout import REFERENCE, EngineRun, Manifest
from aim.pipeline.engine_runs import run_engines
from aim.runtime.backends import runnable_here
from aim.runtime.folder import Build
from aim.tasks import Task, get_task
from aim.verdicts import Check
from aim.verify.judges import judge
from aim.verify.keyed import keyed_plan
from aim.verify.reference import Reference
from aim.verify.results import RunResults
from aim.verify.statistics import statistical_plan


def run_build(build: Build, reference: Reference, runner: str, seed: int = 0, note=lambda what: None) -> RunResults:
    """What the build's engines answer for its checks; `runner`: the backend that runs them (the
    engine's own, or ONNX Runtime on the graphs a TensorRT engine was built from). ONNX Runtime is
    seeded with `seed` first: it seeds only the sessions made after it. The task's own runs are the
    decode loop on the reference's prompts (text generation; nothing for other references)."""
    import onnxruntime

    onnxruntime.set_seed(seed)
    manifest = build.manifest
    class_axis = manifest.modulation.class_axis

    verification = manifest.verification
    fp16 = verification.reduced_precision is not None
    reduced = fp16 or verification.quantized is not None  # int4/int8 builds: the quantized generation checks

    def plan_of(bare):
        if manifest.modulation.noise == "keyed":
            return keyed_plan(bare, class_axis, reference, fp16)
        return statistical_plan(bare.shape, class_axis)

    def task_runs(engine):
        return generation_runs(engine, reference.extra, reduced)

    runners = [build.runner(role, runner) for role in ("bare", "verification", "production")]
    try:
        return run_engines(*runners, reference, plan_of, manifest.dynamic_dims[BATCH].max, task_runs, note)
    finally:
        for each in runners:
            each.close()  # TensorRT runners hold GPU memory


def judge_build(
    manifest: Manifest, task: Task, reference: Reference, results: RunResults, seed: int = 0
) -> list[Check]:
    """Every verdict on a build from what its engines answered: the differential and statistical checks,
    and the task's own against its PyTorch outputs (reference.extra; a user's ONNX has none)."""
    verification = manifest.verification
    reduced = verification.quantized or verification.reduced_precision  # int4 / int8, or FP16
    found = judge(
        results,
        reference,
        verification.tolerance,
        manifest.modulation.class_axis,
        seed,
        reduced,
        keyed=manifest.modulation.noise == "keyed",
    )
    if reference.extra:
        found += task.checks(results.task, reference.extra, verification.tolerance, reduced)
    return found


def verify_folder(folder: str | os.PathLike, seed: int | None = None) -> Manifest:
    """Re-runs the checks of an existing build (every file checked against its hash first; also a
    build that failed them) and records the verdicts in its manifest. `seed`: the statistics' seed
    (default: the build's)."""
    build = Build.open(folder, allow_failed=True)
    manifest = build.manifest
    seed = manifest.verification.seed if seed is None else seed
    runnable, why = runnable_here(manifest.backend)
    runner = manifest.backend if runnable else "onnxruntime"
    reference = Reference.load(manifest.folder / REFERENCE)
    task = get_task(manifest.task)
    found = judge_build(manifest, task, reference, run_build(build, reference, runner, seed), seed)
    verification = manifest.verification
    verification.runner = runner
    verification.engine_run = EngineRun(runnable, why)
    verification.checks = found
    verification.passed = all(check.passed for check in found)
    verification.seed = seed
    verification.verified = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest.save()
    return manifest
