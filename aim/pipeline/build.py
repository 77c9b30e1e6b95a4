"""`make engine`: load -> export -> graph passes -> engine -> verify -> manifest, into OUT/<model>/.

Everything is written into a staging folder and moved to OUT/<model>/ only when verification
passes; a failed verification leaves OUT/<model>.failed/ (with its manifest) for inspection, and an
error (also Ctrl-C or SIGTERM) leaves nothing. A build killed outright leaves its staging folder,
which the next build into the same OUT removes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from aim.contract import LOGITS, MAX_STRENGTH
from aim.errors import VerificationError
from aim.families import Family
from aim.files import StagedFolder, folder_hashes
from aim.graph_passes.noise_key import NoiseKey
from aim.layout import (
    FILES,
    REFERENCE,
    EngineRun,
    GraphIO,
    Manifest,
    ManifestError,
    Modulation,
    Source,
    Verification,
    package_versions,
)
from aim.pipeline import memory, steps
from aim.pipeline.verify import checks, keyed_expectation
from aim.runtime.backends import TENSORRT_BACKENDS, choose_backend, runnable_here
from aim.runtime.base import profile_from_io
from aim.tasks import Task, get_task
from aim.verdicts import Tolerance
from aim.verify.reference import Reference
from aim.verify.tolerance import logit_spread, scaled_tolerance


class Progress:
    """Numbered steps on the log, each with its wall time and resident memory (kept for the manifest):
    at its start and its peak, so that what a step itself adds shows (pipeline/memory.py)."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.step, self.log = total, 0, log
        self.last = time.perf_counter()
        self.timings: dict[str, float] = {}
        self.memory: dict[str, dict[str, float]] = {}

    def __call__(self, what: str):
        self.step += 1
        self.last = time.perf_counter()
        self.fresh_peak = memory.reset_peak()  # else the peak is the process's since it started
        self.start_rss = memory.rss()
        self.log(f"[{self.step}/{self.total}] {what}")

    def done(self, key: str, detail: str = ""):
        now = time.perf_counter()
        self.timings[key] = round(now - self.last, 3)
        self.last = now
        peak, note = memory.peak_rss(), ""
        if peak is not None and self.start_rss is not None and self.fresh_peak:
            peak = max(peak, self.start_rss)  # the kernel's counters lag a little: the step held its start
            self.memory[key] = {"start": round(self.start_rss / 1e6, 1), "peak": round(peak / 1e6, 1)}
            note = f", peak {peak / 1e9:.2f} GB resident (+{(peak - self.start_rss) / 1e9:.2f} GB)"
        self.log(f"      done in {self.timings[key]:.1f} s{note}{': ' + detail if detail else ''}")


def build_model(
    model: str | None,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    backend: str = "onnxruntime",
    seed: int = 0,
    log: Callable[[str], None] = print,
    precision: str = "fp32",
    noise: str = "fresh",
    noise_key: str | os.PathLike | None = None,
) -> Manifest:
    """Builds and verifies the modulated engine of family `model`, or (model None) of the checkpoint
    folder's own architecture into OUT/<the folder's name>; returns its manifest. `noise`: "fresh" or
    "keyed"; `noise_key`: a key file to build keyed noise with, drawn and written there (mode 600)
    once the build has passed if the file does not exist yet."""
    family = steps.family_of(
        model, checkpoint, log
    )  # an unknown name or architecture fails here, before anything is written
    task = get_task(family.task)
    steps.check_precision(family, precision)
    key, fresh_key = steps.noise_key_of(noise, noise_key)  # a bad key file fails here
    backend, why = choose_backend(backend)  # a backend that cannot work fails here, with what to install
    log(f"backend {why}")
    if checkpoint is not None:
        from aim.export.torch_export import checkpoint_config

        checkpoint_config(checkpoint)  # not a checkpoint folder: fails before anything is written
    out = Path(out_dir)
    log_noise(key, fresh_key, noise_key, log)
    with StagedFolder(out / family.name, Manifest.holds_build, (checkpoint, noise_key)) as staged:
        manifest = _build(family, task, staged.path, checkpoint, backend, precision, seed, log, key)
        if not manifest.verification.passed:
            failed = staged.publish(out / f"{family.name}.failed")
            raise VerificationError(
                f"verification failed: {', '.join(manifest.verification.failed())}. Artifacts and report kept "
                f"in {failed}/"
            )
        if fresh_key and noise_key is not None:
            key.write(noise_key)  # before publishing: a published keyed engine always has its key file
        manifest.folder = staged.publish()
    staged.discard(out / f"{family.name}.failed")  # an earlier failure of this model is superseded
    return manifest


def reusable_build(
    model: str | None,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    backend: str = "onnxruntime",
    precision: str = "fp32",
    noise: str = "fresh",
    noise_key: str | os.PathLike | None = None,
    seed: int = 0,
) -> Manifest | None:
    """The verified build in OUT/NAME if it was built as asked (the same weights: the family's tiny
    ones of this seed, or the checkpoint with the files it had; backend, precision, noise and, given a
    key file, that key), else None: `make triton NOISE=keyed` must not serve an earlier fresh-noise
    build. A key file that does not exist yet asks for a build that writes it."""
    family = steps.family_of(model, checkpoint)  # an unknown name fails here
    if noise_key is not None and not Path(noise_key).exists():
        return None
    key, _ = steps.noise_key_of(noise, noise_key)
    try:
        built = Manifest.load(Path(out_dir) / family.name)
    except ManifestError:
        return None
    wanted = str(Path(checkpoint).resolve()) if checkpoint else None
    same = (
        built.verification.passed
        and built.backend == choose_backend(backend)[0]
        and built.precision == precision
        and built.modulation.noise == noise
        and (noise_key is None or built.modulation.key_fingerprint == key.fingerprint)
        and built.source.checkpoint == wanted
        and (built.source.seed == seed if wanted is None else built.source.files == folder_hashes(checkpoint))
    )
    return built if same else None


def log_noise(key: NoiseKey | None, fresh_key: bool, noise_key, log) -> None:
    if key is not None:
        log(
            "noise keyed: "
            + (f"the key in {noise_key}" if not fresh_key else "a fresh key from the OS random source")
            + (f", saved to {noise_key} (mode 600) if the build passes" if fresh_key and noise_key else "")
            + (", kept only inside the engine" if noise_key is None else "")
            + f"; fingerprint {key.fingerprint}"
        )


def modulation_record(
    logits: str,
    class_axis: int,
    num_classes: int,
    upsampled_to: str | None,
    precision: str,
    key: NoiseKey | None = None,
) -> Modulation:
    """What the manifest says about the modulation of a build's logits (fresh noise, or keyed by `key`)."""
    return Modulation(
        logits=logits,
        class_axis=class_axis,
        num_classes=num_classes,
        upsampled_to=upsampled_to,
        formula="logits' = logits + utility * n1 + focus * |n2|, n1, n2 ~ N(0,1) per element, "
        + (
            "keyed: a function of the request and a secret key (the same request, the same answer)"
            if key
            else "fresh per run"
        ),
        utility=f"FP32 [batch], in [0, {MAX_STRENGTH:g}] logit units; 0 = the original model",
        focus=f"FP32 [batch, classes], in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]; > 0 boosts a class, < 0 suppresses it",
        fp32_nodes="every node named aim_redistribution/* computes in FP32"
        + (", also in this FP16 engine" if precision == "fp16" else ""),
        noise="keyed" if key else "fresh",
        key_fingerprint=key.fingerprint if key else None,
    )


def _build(
    family: Family,
    task: Task,
    folder: Path,
    checkpoint,
    backend: str,
    precision: str,
    seed: int,
    log,
    key: NoiseKey | None,
) -> Manifest:
    progress = Progress(6, log)
    progress(
        f"model {family.name} ({family.task}, {family.model_class}) from "
        + (f"checkpoint {checkpoint}" if checkpoint else f"a tiny config, random weights (seed {seed})")
    )
    loaded = steps.load(family, task, checkpoint, seed)
    tokenizer_dir = steps.save_tokenizer(loaded.tokenizer, folder) if loaded.tokenizer is not None else None
    progress.done(
        "load",
        f"{loaded.parameters:,} parameters"
        + (f" stored as {loaded.dtype}, loaded in float32" if loaded.dtype else "")
        + f", {loaded.num_classes} classes"
        + (f", tokenizer of {len(loaded.tokenizer)} tokens" if loaded.tokenizer is not None else "")
        + (
            ", no tokenizer in the checkpoint (verified on token ids; `generate` needs one)"
            if task.uses_tokenizer and loaded.tokenizer is None
            else ""
        ),
    )

    progress("export to ONNX (torch.onnx, dynamic " + ", ".join(family.dims) + ")")
    exported = steps.export(family, task, loaded.model, folder / FILES["exported"])
    weights = folder / FILES["weights"]
    progress.done(
        "export",
        exported.name
        + (f", weights in {weights.name} ({weights.stat().st_size / 1e9:.2f} GB)" if weights.is_file() else ""),
    )

    progress("PyTorch reference on the verification inputs, then the PyTorch model is released")
    keep_fp32 = family.fp16_keep_fp32 + task.keep_fp32(loaded.model)  # found by module: before the model goes
    max_positions = task.positions(loaded.model)  # likewise read from the model's config before it goes
    reference = steps.reference(family, task, loaded, seed)
    reference_path = reference.save(folder / REFERENCE)
    steps.release(loaded)
    progress.done("reference", reference_path.name)

    progress(
        "graph passes: "
        + ("upsample logits, " if task.upsample_logits_to else "")
        + f"redistribution (production{', keyed noise,' if key else ''} + verification)"
        + (", fp16 (redistribution kept fp32)" if precision == "fp16" else "")
        + ", TensorRT compatibility check"
    )
    graphs = steps.passes(task, folder, exported, precision, backend, keep_fp32, key=key)
    unsupported = sum(len(report.errors) for report in graphs.compatibility.values())
    progress.done(
        "passes",
        "TensorRT compatibility: " + ("all nodes supported" if not unsupported else f"{unsupported} unsupported nodes"),
    )

    builds, engine = engine_step(progress, graphs, folder, backend, precision, family.dims, log)

    runnable, why = runnable_here(backend)
    runner = backend if runnable else "onnxruntime"
    progress(
        "verify: PyTorch vs engine ("
        + ("element-wise" if precision == "fp32" else f"{family.fp16.metric} agreement")
        + "), production noise statistics"
        + (
            ""
            if runnable
            else f"; the {backend} engine cannot run here, so ONNX Runtime runs the graphs it was built from"
        )
    )
    production = GraphIO.of(graphs.paths[graphs.sources["production"]])
    manifest = Manifest(
        model=family.name,
        task=task.name,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        source=Source(
            str(loaded.checkpoint) if loaded.checkpoint else None,
            seed,
            loaded.parameters,
            dtype=loaded.dtype,
            model_class=family.model_class,
            files=folder_hashes(loaded.checkpoint) if loaded.checkpoint else {},
        ),
        backend=backend,
        precision=precision,
        engine=engine.name,
        graphs=graphs.sources,
        modulation=modulation_record(
            LOGITS, task.class_axis, loaded.num_classes, task.upsample_logits_to, precision, key
        ),
        tokenizer=tokenizer_dir.name if tokenizer_dir else None,
        graph=production,
        verification_graph=GraphIO.of(graphs.paths[graphs.sources["verification"]]),
        dynamic_dims=dict(family.dims),
        profile=profile_from_io(production.inputs, family.dims),
        tensorrt=builds or None,
        compatibility={role: report.as_dict() for role, report in graphs.compatibility.items()},
        verification=verification_record(
            runner,
            runnable,
            why,
            reference,
            family.tolerance,
            task.class_axis,
            family.fp16 if precision == "fp16" else None,
            seed,
        ),
        artifacts={},
        timings_s=progress.timings,
        memory_mb=progress.memory,  # filled in as the steps end, like timings_s
        versions=package_versions(),
        folder=folder,
        max_positions=max_positions,
    )
    return verify_and_save(manifest, graphs, task, reference, reference_path, key, progress)


def engine_step(progress, graphs, folder: Path, backend: str, precision: str, dims, log) -> tuple[dict, Path]:
    """The engine step of a build: the backend's engines of the graphs; (their build records, the engine's path)."""
    progress(
        f"engine: {backend}"
        + (f" ({precision}, strongly typed)" if backend in TENSORRT_BACKENDS else f" ({precision})")
    )
    builds = steps.engines(graphs, folder, backend, precision, dims, log)
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


def verification_record(
    runner: str,
    runnable: bool,
    why: str,
    reference: Reference,
    tolerance: Tolerance,
    class_axis: int,
    reduced,
    seed: int,
) -> Verification:
    """The manifest's verification entry before the checks run: who runs them, on what, within what."""
    return Verification(
        passed=False,
        runner=runner,
        engine_run=EngineRun(runnable, why),
        shapes=reference.shapes(),
        tolerance=scaled_tolerance(tolerance, reference.logits, class_axis),
        reduced_precision=reduced,
        checks=[],
        seed=seed,
        logit_spread=logit_spread(reference.logits, class_axis),
    )


def verify_and_save(
    manifest: Manifest, graphs, task: Task, reference: Reference, reference_path: Path, key: NoiseKey | None, progress
) -> Manifest:
    """Records every file of the build folder (graphs, reference, and whatever else the build depends
    on: external weights, the tokenizer), adds to the reference what a keyed engine must answer, runs
    every check and saves the manifest."""
    folder, verification = manifest.folder, manifest.verification
    for role, path in graphs.paths.items():
        manifest.record(role, path)
    if key is not None:
        reference.keyed_modulated = keyed_expectation(manifest, reference, verification.runner, key)
        verification.shapes = reference.shapes()
        reference.save(reference_path)  # again, with what the keyed engine must answer
    manifest.record("reference", reference_path)
    recorded = {entry.path for entry in manifest.artifacts.values()}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if str(path.relative_to(folder)) not in recorded:
            manifest.record(str(path.relative_to(folder)), path)
    found = checks(manifest, task, reference, verification.runner, verification.seed)
    verification.checks = found
    verification.passed = all(check.passed for check in found)
    skipped = (
        "" if verification.engine_run.ran else f" on ONNX Runtime; engine run skipped: {verification.engine_run.reason}"
    )
    progress.done("verify", ("passed" if verification.passed else "FAILED") + skipped)
    manifest.save()
    return manifest
