"""`aim verify`: re-run a build's checks against its stored reference (no PyTorch needed)."""

from __future__ import annotations

import os
from datetime import datetime, timezone

from aim.contract import BATCH
from aim.generation.reference_runs import generation_runs
from aim.graph_passes.noise_key import NoiseKey
from aim.layout import REFERENCE, EngineRun, Manifest
from aim.runtime.backends import runnable_here
from aim.runtime.folder import open_build, role_runners
from aim.tasks import Task, get_task
from aim.verdicts import Check
from aim.verify.build import verify_build
from aim.verify.reference import Reference


def checks(manifest: Manifest, task: Task, reference: Reference, runner: str, seed: int = 0) -> list[Check]:
    """Every verdict on a build folder's engines against its reference; `runner`: the backend that runs
    the checks (the engine's own, or ONNX Runtime on the graphs a TensorRT engine was built from)."""
    import onnxruntime

    onnxruntime.set_seed(seed)  # before the runners' sessions exist: it seeds only sessions made after it
    runners = role_runners(manifest, runner)
    try:
        verification = manifest.verification
        found = verify_build(
            *runners,
            reference,
            verification.tolerance,
            manifest.modulation.class_axis,
            manifest.dynamic_dims[BATCH].max,
            seed,
            verification.reduced_precision,
            keyed=manifest.modulation.noise == "keyed",
        )
        # Task-level checks compare with the task's own PyTorch outputs (reference.extra): a user's ONNX has none.
        # The production engine runs the decode loop on the reference's prompts; the task judges the arrays.
        reduced = verification.reduced_precision
        task_checks = (
            task.checks(
                generation_runs(runners[2], reference.extra, reduced is not None),
                reference.extra,
                verification.tolerance,
                reduced,
            )
            if reference.extra
            else []
        )
        return found + task_checks
    finally:
        for each in runners:
            each.close()  # TensorRT runners hold GPU memory


def keyed_expectation(manifest: Manifest, reference: Reference, runner: str, key: NoiseKey):
    """What a keyed production engine must answer to the reference's inputs and knobs: the PyTorch
    twin of the same keyed statement on the logits of the build's bare engine (run by `runner`), so
    that the twin's digest is computed from the very logits the engine's subgraph sees (FP16 ones
    included)."""
    import torch

    from aim.graph_passes.redistribution import redistribute_torch

    runners = role_runners(manifest, runner)
    try:
        bare = torch.from_numpy(runners[0].run(reference.inputs))
    finally:
        for each in runners:
            each.close()
    knobs = torch.from_numpy(reference.utility), torch.from_numpy(reference.focus)
    return redistribute_torch(bare, *knobs, class_axis=manifest.modulation.class_axis, key=key).numpy()


def verify_folder(folder: str | os.PathLike, seed: int | None = None) -> Manifest:
    """Re-runs the checks of an existing build (every file checked against its hash first) and
    records the verdicts in its manifest. `seed`: the statistics' seed (default: the build's)."""
    manifest = open_build(folder)
    seed = manifest.verification.seed if seed is None else seed
    runnable, why = runnable_here(manifest.backend)
    runner = manifest.backend if runnable else "onnxruntime"
    reference = Reference.load(manifest.folder / REFERENCE)
    found = checks(manifest, get_task(manifest.task), reference, runner, seed)
    verification = manifest.verification
    verification.runner = runner
    verification.engine_run = EngineRun(runnable, why)
    verification.checks = found
    verification.passed = all(check.passed for check in found)
    verification.seed = seed
    verification.verified = datetime.now(timezone.utc).isoformat(timespec="seconds")
    manifest.save()
    return manifest
