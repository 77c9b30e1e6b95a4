"""`make engine`: one build for every source, into OUT/<the source's name>/:

    the source's steps (load, export, reference) -> graph passes -> engine -> verify -> manifest

Everything is written into a staging folder and moved to OUT/<name>/ only when verification passes;
a failed verification leaves OUT/<name>.failed/ (with its manifest) for inspection, and an error (also
Ctrl-C or SIGTERM) leaves nothing. A build killed outright leaves its staging folder, which the next
build into the same OUT removes. `reusable` is the one rule for keeping an existing build instead.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from aim.contract import BATCH, MAX_STRENGTH
from aim.errors import VerificationError
from aim.files import StagedFolder
from aim.graph_passes.noise_key import NoiseKey
from aim.layout import (
    REFERENCE,
    EngineRun,
    GraphIO,
    Manifest,
    ManifestError,
    Modulation,
    Verification,
    package_versions,
)
from aim.pipeline import steps
from aim.pipeline.progress import Progress
from aim.pipeline.request import BuildRequest, Resolved
from aim.pipeline.source import Prepared, Source
from aim.pipeline.verify import judge_build, run_build
from aim.runtime.backends import TENSORRT_BACKENDS, runnable_here
from aim.runtime.base import profile_from_io
from aim.runtime.folder import Build
from aim.verify.reference import keyed_expectation
from aim.verify.tolerance import logit_spread, scaled_tolerance


def build(source: Source, request: BuildRequest, log: Callable[[str], None] = print) -> Build:
    """Builds and verifies the modulated engine of `source` as `request` asks, into OUT/<source.name>/;
    a failed verification raises VerificationError (the folder kept as OUT/<name>.failed/). Keyed noise
    with a key file that does not exist yet: a fresh key is written there (mode 600) once the build has
    passed."""
    resolved = request.resolve()
    log(f"backend {resolved.why}")
    source.check(resolved, log)  # whatever can fail before anything is written fails here
    if resolved.key is not None:
        log(resolved.noise_line())
    out = resolved.out
    # Only a build folder of ours is replaced, and never one holding (or inside) what the build is made from.
    with StagedFolder(out / source.name, Manifest.holds_build, (*source.paths, request.key)) as staged:
        manifest = _build(source, resolved, staged.path, log)
        if not manifest.verification.passed:
            failed = staged.publish(out / f"{source.name}.failed")
            raise VerificationError(
                f"verification failed: {', '.join(manifest.verification.failed())}. Artifacts and report kept "
                f"in {failed}/"
            )
        if resolved.fresh_key and request.key is not None:
            resolved.key.write(request.key)  # before publishing: a published keyed engine always has its key file
        manifest.folder = staged.publish()
    staged.discard(out / f"{source.name}.failed")  # an earlier failure of this build is superseded
    return Build(manifest)


def reusable(source: Source, request: BuildRequest) -> Build | None:
    """The build in OUT/<source.name>/ if it passed verification, every file it records still has its
    hash, and it was made as asked: from this source as it is now (the same weights, file or seed), with
    the backend, precision, noise and key (given a key file) and, if asked, the largest batch; else None.
    `make triton NOISE=keyed` must not serve an earlier fresh-noise build. A key file that does not exist
    yet asks for a build that writes it."""
    if request.key is not None and not Path(request.key).exists():
        return None
    resolved = request.resolve()
    try:
        built = Manifest.load(Path(request.out) / source.name)
    except ManifestError:
        return None
    made_as_asked = (
        built.verification.passed
        and built.backend == resolved.backend
        and built.precision == request.precision
        and built.modulation.noise == request.noise
        and (request.key is None or built.modulation.key_fingerprint == resolved.key.fingerprint)
        and (request.max_batch is None or built.dynamic_dims[BATCH].max == request.max_batch)
        and source.made(built, resolved)
    )
    return Build(built) if made_as_asked and not built.changed_artifacts() else None


def build_or_reuse(source: Source, request: BuildRequest, log: Callable[[str], None] = print) -> tuple[Build, bool]:
    """(the build, whether it was reused): the reusable one if there is one, else a new one."""
    kept = reusable(source, request)
    return (kept, True) if kept is not None else (build(source, request, log), False)


def _build(source: Source, request: Resolved, folder: Path, log) -> Manifest:
    progress = Progress(source.steps + 3, log)
    try:
        prepared = source.prepare(folder, request, progress)
        graphs = _passes(prepared, folder, request, progress)
        if graphs.quantization is not None and graphs.quantization.matmuls == 0:
            prepared.quantized = None  # nothing was quantized: the engine is the FP32 graph, held to FP32's tolerance
        builds, engine = _engines(graphs, prepared, folder, request, progress, log)
        runnable, why = runnable_here(request.backend)
        runner = request.backend if runnable else "onnxruntime"
        reduced = prepared.fp16
        progress(
            f"verify: {prepared.reference.source} vs engine ("
            + (
                f"relative error <= {prepared.quantized.max_relative_error:g} or 3x the model's sensitivity, "
                "top-1 where clear"
                if prepared.quantized
                else "element-wise"
                if reduced is None
                else f"{reduced.metric} agreement"
            )
            + "), production noise statistics"
            + (
                ""
                if runnable
                else f"; the {request.backend} engine cannot run here, so ONNX Runtime runs the graphs it was built "
                "from"
            )
        )
        manifest = _manifest(source, prepared, graphs, builds, engine, request, folder, progress)
        manifest.verification.runner, manifest.verification.engine_run = runner, EngineRun(runnable, why)
        return _verify(manifest, graphs, prepared, request.key, progress)
    finally:
        progress.close()


def _passes(prepared: Prepared, folder: Path, request: Resolved, progress: Progress) -> steps.Graphs:
    progress(
        "graph passes: "
        + (f"upsample logits to {prepared.upsample_to!r}, " if prepared.upsample_to else "")
        + f"redistribution (production{', keyed noise,' if request.key else ''} + verification)"
        + (", fp16 (redistribution kept fp32)" if prepared.convert == "fp16" else "")
        + (
            f"; on the {prepared.convert} graph (quantized above; redistribution kept fp32)"
            if prepared.quantization
            else f"; {prepared.convert} weights first (MatMulNBits, ONNX Runtime's quantizer; redistribution kept fp32)"
            if prepared.quantized
            else ", TensorRT compatibility check"
        )
    )
    progress.log("      " + modulated_output(GraphIO.of(prepared.exported), prepared))
    graphs = steps.passes(
        folder,
        prepared.exported,
        prepared.convert,
        request.backend,
        prepared.class_axis,
        prepared.upsample_to,
        prepared.keep_fp32,
        logits=prepared.logits,
        key=request.key,
        quantization=prepared.quantization,
    )
    if graphs.quantization is not None:
        warning = graphs.quantization.warning()
        if warning:
            progress.log("      " + warning)
        progress.done("passes", graphs.quantization.summary())
        return graphs
    unsupported = sum(len(report.errors) for report in graphs.compatibility.values())
    progress.done(
        "passes",
        "TensorRT compatibility: " + ("all nodes supported" if not unsupported else f"{unsupported} unsupported nodes"),
    )
    return graphs


def modulated_output(io: GraphIO, prepared: Prepared) -> str:
    """Which output the redistribution modulates, on which class axis, and what else passes through."""
    logits = next(tensor for tensor in io.outputs if tensor.name == prepared.logits)
    others = [tensor.name for tensor in io.outputs if tensor.name != prepared.logits]
    classes = prepared.reference.logits.shape[prepared.class_axis]
    per = [f"axis {axis}" for axis in range(len(logits.dims)) if axis != prepared.class_axis]
    return (
        f"modulates output {logits.name!r} {logits.dtype} {logits.dims}"
        + (f" resized to the spatial size of input {prepared.upsample_to!r}" if prepared.upsample_to else "")
        + f", classes on axis {prepared.class_axis} ({classes} classes), one draw per class at every index of "
        + (", ".join(per) if per else "no other axis")
        + (f"; passed through unchanged: {', '.join(repr(name) for name in others)}" if others else "")
    )


def _engines(graphs, prepared: Prepared, folder: Path, request: Resolved, progress: Progress, log):
    """The backend's engines of the graphs; (their TensorRT build records, the engine's path)."""
    backend, precision = request.backend, prepared.precision
    progress(
        f"engine: {backend}"
        + (f" ({precision}, strongly typed)" if backend in TENSORRT_BACKENDS else f" ({precision})")
    )
    builds = steps.engines(graphs, folder, backend, precision, prepared.dims, log)
    engine = graphs.paths["engine"]
    progress.done(
        "engine",
        engine.name
        + (
            f": {builds['engine']['bytes'] / 1e6:.1f} MB, built in {builds['engine']['build_s']:.1f} s"
            if builds
            else ""
        ),
    )
    return builds, engine


def _manifest(source, prepared: Prepared, graphs, builds, engine, request: Resolved, folder, progress) -> Manifest:
    """The one manifest of a build, before its checks run."""
    reference = prepared.reference
    production = GraphIO.of(graphs.paths[graphs.sources["production"]])
    return Manifest(
        model=source.name,
        task=prepared.task.name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=prepared.record,
        backend=request.backend,
        precision=prepared.precision,
        engine=engine.name,
        graphs=graphs.sources,
        modulation=modulation_record(prepared, request.key),
        tokenizer=prepared.tokenizer,
        graph=production,
        verification_graph=GraphIO.of(graphs.paths[graphs.sources["verification"]]),
        dynamic_dims=dict(prepared.dims),
        profile=profile_from_io(production.inputs, prepared.dims),
        tensorrt=builds or None,
        compatibility={role: report.as_dict() for role, report in graphs.compatibility.items()},
        verification=Verification(
            passed=False,
            runner=request.backend,
            engine_run=EngineRun(True),
            shapes=reference.shapes(),
            tolerance=scaled_tolerance(prepared.tolerance, reference.logits, prepared.class_axis),
            reduced_precision=prepared.fp16,
            checks=[],
            seed=request.seed,
            logit_spread=logit_spread(reference.logits, prepared.class_axis),
            quantized=prepared.quantized,
        ),
        artifacts={},
        timings_s=progress.timings,
        memory_mb=progress.memory,  # filled in as the steps end, like timings_s
        versions=package_versions(),
        folder=folder,
        max_positions=prepared.max_positions,
        quantization=graphs.quantization.as_dict() if graphs.quantization is not None else None,
    )


def modulation_record(prepared: Prepared, key: NoiseKey | None = None) -> Modulation:
    """What the manifest says about the modulation of a build's logits (fresh noise, or keyed by `key`)."""
    return Modulation(
        logits=prepared.logits,
        class_axis=prepared.class_axis,
        num_classes=int(prepared.reference.logits.shape[prepared.class_axis]),
        upsampled_to=prepared.upsample_to,
        formula="logits' = logits + utility * n1 + focus * |n2|, n1, n2 ~ N(0,1) per element, "
        + (
            "keyed: a function of the request and a secret key (the same request, the same answer)"
            if key
            else "fresh per run"
        ),
        utility=f"FP32 [batch], in [0, {MAX_STRENGTH:g}] logit units; 0 = the original model",
        focus=f"FP32 [batch, classes], in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]; > 0 boosts a class, < 0 suppresses it",
        fp32_nodes="every node named aim_redistribution/* computes in FP32"
        + (f", also in this {prepared.precision.upper()} engine" if prepared.precision != "fp32" else ""),
        noise="keyed" if key else "fresh",
        key_fingerprint=key.fingerprint if key else None,
    )


def _verify(manifest: Manifest, graphs, prepared: Prepared, key: NoiseKey | None, progress: Progress) -> Manifest:
    """Runs the engines once and judges what they answered; records every file of the build folder
    (graphs, reference, and whatever else the build depends on: external weights, the tokenizer), the
    reference with what a keyed engine must answer (the twin on the bare engine's logits), and the
    verdicts; saves the manifest."""
    folder, verification, reference = manifest.folder, manifest.verification, prepared.reference
    for role, path in graphs.paths.items():
        manifest.record(role, path)
    results = run_build(Build(manifest), reference, verification.runner, verification.seed, progress.note)
    if key is not None:
        reference.keyed_modulated = keyed_expectation(results.bare, reference, prepared.class_axis, key)
        verification.shapes = reference.shapes()
        reference.save(folder / REFERENCE)  # again, with what the keyed engine must answer
    manifest.record("reference", folder / REFERENCE)
    recorded = {entry.path for entry in manifest.artifacts.values()}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if str(path.relative_to(folder)) not in recorded:
            manifest.record(str(path.relative_to(folder)), path)
    found = judge_build(manifest, prepared.task, reference, results, verification.seed)
    verification.checks = found
    verification.passed = all(check.passed for check in found)
    skipped = (
        "" if verification.engine_run.ran else f" on ONNX Runtime; engine run skipped: {verification.engine_run.reason}"
    )
    progress.done("verify", ("passed" if verification.passed else "FAILED") + skipped)
    manifest.save()
    return manifest
