"""`make engine`: export -> graph passes -> engine -> verify -> manifest, into build/<model>/.

Everything is written into a staging folder and moved to build/<model>/ only when verification
passes; a failed verification leaves build/<model>.failed/ (with its manifest) for inspection, and an
error leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from aim.runtime import onnxruntime as ort_engine
from aim.tasks.generation import TOKENIZER_DIR
from aim.layout import file_entry, graph_io, package_versions, read_manifest, sha256, write_manifest
from aim.verify.checks import REFERENCE, make_reference, verify_build
from aim.errors import AimError, VerificationError
from aim.families import Agreement, Tolerance, export_onnx, get_config, load_model
from aim.graph_passes.io import atomic_path, load_onnx, save_onnx
from aim.graph_passes.modulate import deployment_graphs
from aim.graph_passes.redistribution import MAX_STRENGTH

# "auto" picks TensorRT where a CUDA GPU and the tensorrt module are present, else ONNX Runtime.
BACKENDS = ("auto", "onnxruntime", "tensorrt", "tensorrt-rtx")
TENSORRT_BACKENDS = ("tensorrt", "tensorrt-rtx")
PRECISIONS = ("fp32", "fp16")
# Which graph each engine runs: the bare model, the verification flavour, the production flavour.
ROLES = {"bare": "bare", "verification": "verification", "production": "modulated"}
FILES = {
    "exported": "exported.onnx",  # torch.onnx's output, untouched
    "bare": "bare.onnx",  # the deployable model without modulation (logits resized, if the family asks)
    "modulated": "modulated.onnx",  # production flavour: in-graph noise
    "verification": "modulated.verify.onnx",  # the noise as inputs, for element-wise comparison
    "engine": "engine.onnxruntime.onnx",  # ONNX Runtime's optimised model
}


def engine_files(backend: str) -> dict[str, str]:
    """Engine artifacts of a backend: ONNX Runtime has one (the graphs run as they are); TensorRT has a
    plan per graph, since the differential checks run the bare and verification graphs as engines too."""
    if backend == "onnxruntime":
        return {"engine": FILES["engine"]}
    return {"engine": f"engine.{backend}.plan", "engine.bare": f"bare.{backend}.plan", "engine.verification": f"modulated.verify.{backend}.plan"}


def choose_backend(requested: str = "auto") -> tuple[str, str]:
    """The backend to use and one line saying why."""
    from aim.runtime import tensorrt as trt_engine

    if requested not in BACKENDS:
        raise AimError(f"unknown backend {requested!r}; available: {', '.join(BACKENDS)}")
    if requested == "onnxruntime":
        return requested, "onnxruntime: asked for"
    if requested == "tensorrt-rtx":
        trt_engine.import_api(requested)  # fails with what to install
        runnable, why = trt_engine.engine_runnable(requested)
        return requested, "tensorrt-rtx: asked for; builds here" + ("" if runnable else f", but cannot run here ({why})")
    if requested == "tensorrt":
        trt_engine.import_api(requested)
        gpu, why = trt_engine.cuda_gpu_available()
        if not gpu:
            raise trt_engine.BackendUnavailableError(
                f"backend tensorrt builds and runs on an NVIDIA GPU, and this machine has none ({why}). "
                f"Use BACKEND=tensorrt-rtx to build a TensorRT for RTX engine here, or BACKEND=onnxruntime."
            )
        return requested, f"tensorrt: asked for ({why})"
    gpu, why = trt_engine.cuda_gpu_available()
    if not gpu:
        return "onnxruntime", f"onnxruntime: auto, no CUDA GPU for TensorRT ({why})"
    try:
        trt_engine.import_api("tensorrt")
    except trt_engine.BackendUnavailableError:
        return "onnxruntime", f"onnxruntime: auto, {why} but the tensorrt module is not installed (pip install -e '.[gpu]')"
    return "tensorrt", f"tensorrt: auto, {why} and tensorrt installed"


class Progress:
    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.step, self.log = total, 0, log
        self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def __call__(self, what: str):
        self.step += 1
        self.log(f"[{self.step}/{self.total}] {what}")

    def done(self, key: str, detail: str = ""):
        now = time.perf_counter()
        self.timings[key] = round(now - self.last, 3)
        self.last = now
        self.log(f"      done in {self.timings[key]:.1f} s{': ' + detail if detail else ''}")


def build_model(
    model: str,
    out_dir: str | os.PathLike = "build",
    checkpoint: str | os.PathLike | None = None,
    backend: str = "onnxruntime",
    seed: int = 0,
    log: Callable[[str], None] = print,
    precision: str = "fp32",
) -> dict:
    """Builds and verifies the modulated engine of `model`; returns the manifest."""
    config = get_config(model)  # an unknown name fails here, before anything is written
    if precision not in PRECISIONS:
        raise AimError(f"unknown precision {precision!r}; available: {', '.join(PRECISIONS)}")
    if precision == "fp16" and config.fp16 is None:
        raise AimError(f"{config.name} states no FP16 comparator (ExportConfig.fp16), so an FP16 engine could not be verified")
    backend, why = choose_backend(backend)  # a backend that cannot work fails here, with what to install
    log(f"backend {why}")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise AimError(f"--checkpoint {checkpoint}: no such folder. Pass a folder written by save_pretrained.")
    out_root = Path(out_dir)
    final, failed = out_root / config.name, out_root / f"{config.name}.failed"
    staging = out_root / f".{config.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build(config, staging, checkpoint, backend, precision, seed, log)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(out_root)
        raise
    if not manifest["verification"]["passed"]:
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(staging, failed)
        broken = [c["name"] for c in manifest["verification"]["checks"] if not c["passed"]]
        raise VerificationError(f"verification failed: {', '.join(broken)}. Artifacts and report kept in {failed}/")
    _swap_in(staging, final)
    shutil.rmtree(failed, ignore_errors=True)
    manifest["folder"] = str(final)
    return manifest


def _remove_if_empty(folder: Path):
    try:
        folder.rmdir()
    except OSError:
        pass


def _swap_in(staging: Path, final: Path):
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def _build(config, folder: Path, checkpoint, backend: str, precision: str, seed: int, log) -> dict:
    from aim.runtime import tensorrt as trt_engine
    from aim.graph_passes.fp16 import convert_to_fp16
    from aim.graph_passes.trt_support import check_tensorrt_support

    paths = {key: folder / name for key, name in FILES.items() if key != "engine"}
    paths.update({key: folder / name for key, name in engine_files(backend).items()})
    progress = Progress(5, log)

    progress(f"model {config.name} ({config.task}) from " + (f"checkpoint {checkpoint}" if checkpoint else f"a tiny config, random weights (seed {seed})"))
    model = load_model(config, checkpoint, seed)
    num_classes = config.num_classes(model)
    parameters = sum(p.numel() for p in model.parameters())
    tokenizer = config.tokenizer(model, checkpoint) if config.tokenizer else None
    if tokenizer is not None:
        tokenizer.save_pretrained(folder / TOKENIZER_DIR)  # generation needs nothing but the build folder
    progress.done("load", f"{parameters:,} parameters, {num_classes} classes" + (f", tokenizer of {len(tokenizer)} tokens" if tokenizer is not None else ""))

    progress("export to ONNX (torch.onnx, dynamic " + ", ".join(config.dims) + ")")
    export_onnx(config, model, paths["exported"])
    progress.done("export", paths["exported"].name)

    progress(
        "graph passes: " + ("upsample logits, " if config.upsample_logits_to else "") + "redistribution (production + verification)"
        + (", fp16 (redistribution kept fp32)" if precision == "fp16" else "") + ", TensorRT compatibility check"
    )
    graphs = deployment_graphs(load_onnx(paths["exported"]), config.logits.name, config.class_axis, config.upsample_logits_to)
    if config.upsample_logits_to:
        save_onnx(graphs["bare"], paths["bare"])
    else:
        paths["bare"] = paths["exported"]  # nothing changed: the exported file is the bare model
    save_onnx(graphs["production"], paths["modulated"])
    save_onnx(graphs["verification"], paths["verification"])
    sources = {role: key for role, key in ROLES.items()}  # artifact keys of the graphs the engines run
    if precision == "fp16":
        for role, key in ROLES.items():
            half = folder / paths[key].name.replace(".onnx", ".fp16.onnx")
            save_onnx(convert_to_fp16(load_onnx(paths[key]), config.fp16_keep_fp32), half)
            paths[f"{key}.fp16"] = half
            sources[role] = f"{key}.fp16"
    target = backend if backend in TENSORRT_BACKENDS else "tensorrt"  # ONNX Runtime builds: would TensorRT take it?
    compatibility = {role: check_tensorrt_support(paths[key], backend=target) for role, key in sources.items()}
    unsupported: dict[str, list[str]] = {}  # finding -> the graphs that have it
    for role, report_ in compatibility.items():
        for finding in report_.errors:
            unsupported.setdefault(str(finding), []).append(role)
    if unsupported and backend in TENSORRT_BACKENDS:
        listed = [f"{finding} [{', '.join(roles)}]" for finding, roles in unsupported.items()]
        more = f"\n  ... and {len(listed) - 20} more" if len(listed) > 20 else ""
        raise trt_engine.EngineBuildError(
            f"TensorRT's ONNX parser would refuse {len(listed)} node(s):\n  " + "\n  ".join(listed[:20]) + more
            + "\nUse BACKEND=onnxruntime, or change the model."
        )
    progress.done("passes", "TensorRT compatibility: " + ("all nodes supported" if not unsupported else f"{len(unsupported)} unsupported nodes"))

    dims = {name: asdict(rng) for name, rng in config.dims.items()}
    builds = {}
    progress(f"engine: {backend}" + (f" ({precision}, strongly typed)" if backend in TENSORRT_BACKENDS else f" ({precision})"))
    if backend == "onnxruntime" and precision == "fp16":
        # ONNX Runtime's CPU provider lacks most FP16 kernels and saves its optimised model with its own
        # FP32 fallbacks baked in (not portable, and with If branches not even valid): the FP16 graph
        # itself is the engine, optimised at load time exactly as the bare graph it is checked against.
        with atomic_path(paths["engine"]) as tmp:
            shutil.copyfile(paths[sources["production"]], tmp)
        progress.done("engine", f"{paths['engine'].name} (the FP16 graph, optimised by ONNX Runtime at load time)")
    elif backend == "onnxruntime":
        ort_engine.build(paths[sources["production"]], paths["engine"])
        progress.done("engine", paths["engine"].name)
    else:
        cache = trt_engine.default_timing_cache(backend)
        for role, key in (("production", "engine"), ("bare", "engine.bare"), ("verification", "engine.verification")):
            source = paths[sources[role]]
            result = trt_engine.build_engine(
                source, paths[key], backend, trt_engine.profile_from_io(graph_io(source)["inputs"], dims), cache, log
            )
            builds[key] = result.as_dict()
        engine = builds["engine"]
        progress.done("engine", f"{paths['engine'].name}: {engine['bytes'] / 1e6:.1f} MB, built in {engine['build_s']:.1f} s")

    runnable, why = (True, "") if backend == "onnxruntime" else trt_engine.engine_runnable(backend)
    runner = backend if runnable else "onnxruntime"
    progress(
        "verify: PyTorch vs engine (" + ("element-wise" if precision == "fp32" else f"{config.fp16.metric} agreement") + "), production noise statistics"
        + ("" if runnable else f"; the {backend} engine cannot run here, so ONNX Runtime runs the graphs it was built from")
    )
    reference = make_reference(config, model, seed)
    if config.task_reference:
        reference.update(config.task_reference(config, model, tokenizer, seed))
    with atomic_path(folder / REFERENCE) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **reference)
    io = {role: graph_io(paths[key]) for role, key in sources.items()}
    tensorrt = {key: build for key, build in builds.items()}
    runners = make_runners(folder, backend, runner, {role: paths[key].name for role, key in sources.items()}, paths["engine"].name, io, tensorrt)
    reduced = config.fp16 if precision == "fp16" else None
    checks = run_checks(folder, runners, config.tolerance, config.class_axis, config.dims["batch"].max, seed, reduced, config.task_checks)
    passed = all(check.passed for check in checks)
    progress.done("verify", ("passed" if passed else "FAILED") + ("" if runnable else f" on ONNX Runtime; engine run skipped: {why}"))

    artifacts = {key: file_entry(path, folder) for key, path in paths.items()}
    artifacts["reference"] = file_entry(folder / REFERENCE, folder)
    if tokenizer is not None and (folder / TOKENIZER_DIR / "tokenizer.json").is_file():
        artifacts["tokenizer"] = file_entry(folder / TOKENIZER_DIR / "tokenizer.json", folder)
    profile = trt_engine.profile_from_io(io["production"]["inputs"], dims)
    manifest = {
        "model": config.name,
        "task": config.task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "seed": seed, "parameters": parameters},
        "backend": backend,
        "precision": precision,
        "engine": paths["engine"].name,
        # The graphs each engine was built from (artifact keys): bare model, verification, production.
        "graphs": sources,
        "modulation": {
            "logits": config.logits.name,
            "class_axis": config.class_axis,
            "num_classes": num_classes,
            "upsampled_to": config.upsample_logits_to,
            "formula": "logits' = logits + utility * n1 + focus * |n2|, n1, n2 ~ N(0,1) per element, fresh per run",
            "utility": f"FP32 [batch], in [0, {MAX_STRENGTH:g}] logit units; 0 = the original model",
            "focus": f"FP32 [batch, classes], in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]; > 0 boosts a class, < 0 suppresses it",
            "fp32_nodes": "every node named aim_redistribution/* computes in FP32" + (", also in this FP16 engine" if precision == "fp16" else ""),
        },
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,  # text families: what generation decodes with
        "graph": io["production"],
        "verification_graph": io["verification"],
        "dynamic_dims": dims,
        # min/opt/max shape of every production input: TensorRT's optimization profile (enforced by
        # TensorRT engines and their runner; for ONNX Runtime the range the build was made for).
        "profile": profile,
        "tensorrt": tensorrt or None,
        "compatibility": {role: report.as_dict() for role, report in compatibility.items()},
        "verification": {
            "passed": passed,
            "runner": runner,
            "engine_run": {"ran": runnable, "reason": "" if runnable else why},
            "shapes": {name: list(array.shape) for name, array in reference.items()},
            "tolerance": asdict(config.tolerance),
            "reduced_precision": asdict(reduced) if reduced else None,
            "checks": [check.as_dict() for check in checks],
        },
        "artifacts": artifacts,
        "timings_s": progress.timings,
        "versions": package_versions(),
    }
    write_manifest(manifest, folder)
    return manifest


def make_runners(folder: Path, backend: str, runner: str, graphs: dict, engine: str, io: dict, tensorrt: dict):
    """(bare, verification, production) runners. `runner` is the backend that runs them: the engine's
    own, or ONNX Runtime on the very graphs a TensorRT engine was built from where it cannot run."""
    if runner in TENSORRT_BACKENDS:
        from aim.runtime.tensorrt import TensorRTEngine, engine_io

        plans = {"bare": "engine.bare", "verification": "engine.verification", "production": "engine"}
        engines = []
        for role in ("bare", "verification", "production"):
            build = tensorrt[plans[role]]
            inputs, outputs = engine_io(io[role])
            engines.append(TensorRTEngine(folder / build["path"], runner, inputs, outputs, build["profile"]))
        return engines
    production = engine if backend == "onnxruntime" else graphs["production"]
    return [ort_engine.OnnxRuntimeEngine(folder / name) for name in (graphs["bare"], graphs["verification"], production)]


def run_checks(
    folder: Path, runners, tolerance: Tolerance, class_axis: int, max_batch: int, seed: int = 0,
    reduced: Agreement | None = None, task_checks=None,
):
    """The checks of a build folder against its reference.npz (PyTorch outputs stored at build time);
    `task_checks(engine, reference, tolerance, reduced)`: the family's task-level checks (e.g. generation)."""
    import onnxruntime

    with np.load(folder / REFERENCE) as stored:
        reference = dict(stored)
    onnxruntime.set_seed(seed)  # reproducible statistics; production runs are not seeded
    try:
        checks = verify_build(*runners, reference, tolerance, class_axis, max_batch, seed, reduced)
        if task_checks:
            checks += task_checks(runners[2], reference, tolerance, reduced)
        return checks
    finally:
        for runner in runners:
            getattr(runner, "close", lambda: None)()  # TensorRT runners hold GPU memory


def production_runner(folder: str | os.PathLike, manifest: dict | None = None):
    """(runner, note) for a build's production engine: the engine itself where it can run, else ONNX
    Runtime on the production graph it was built from, with `note` saying why (for generation, serving)."""
    from aim.runtime import tensorrt as trt_engine

    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    backend = manifest["backend"]
    runnable, why = (True, "") if backend == "onnxruntime" else trt_engine.engine_runnable(backend)
    graph = manifest["artifacts"][(manifest.get("graphs") or ROLES)["production"]]["path"]
    if runnable and backend in TENSORRT_BACKENDS:
        build = manifest["tensorrt"]["engine"]
        inputs, outputs = trt_engine.engine_io(graph_io(folder / graph))
        return trt_engine.TensorRTEngine(folder / build["path"], backend, inputs, outputs, build["profile"]), ""
    if backend == "onnxruntime":
        return ort_engine.OnnxRuntimeEngine(folder / manifest["engine"]), ""
    return ort_engine.OnnxRuntimeEngine(folder / graph), f"{manifest['engine']} cannot run here ({why}): running {graph} on ONNX Runtime"


def verify_folder(folder: str | os.PathLike, seed: int = 0) -> dict:
    """Re-runs the checks of an existing build (no PyTorch needed) and updates its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    paths = {key: folder / entry["path"] for key, entry in manifest["artifacts"].items()}
    for key, entry in manifest["artifacts"].items():
        if not paths[key].is_file() or sha256(paths[key]) != entry["sha256"]:
            raise AimError(f"{paths[key]} is missing or changed since the build (sha256 differs): rebuild with `make engine`")
    from aim.runtime import tensorrt as trt_engine

    tolerance = Tolerance(**manifest["verification"]["tolerance"])
    reduced = manifest["verification"].get("reduced_precision")
    backend = manifest["backend"]
    runnable, why = (True, "") if backend == "onnxruntime" else trt_engine.engine_runnable(backend)
    runner = backend if runnable else "onnxruntime"
    sources = manifest.get("graphs") or ROLES
    graphs = {role: manifest["artifacts"][key]["path"] for role, key in sources.items()}
    io = {role: graph_io(folder / path) for role, path in graphs.items()}
    runners = make_runners(folder, backend, runner, graphs, manifest["engine"], io, manifest.get("tensorrt") or {})
    checks = run_checks(
        folder, runners, tolerance, manifest["modulation"]["class_axis"], manifest["dynamic_dims"]["batch"]["max"], seed,
        Agreement(**reduced) if reduced else None, get_config(manifest["model"]).task_checks,
    )
    manifest["verification"]["runner"] = runner
    manifest["verification"]["engine_run"] = {"ran": runnable, "reason": "" if runnable else why}
    manifest["verification"]["checks"] = [check.as_dict() for check in checks]
    manifest["verification"]["passed"] = all(check.passed for check in checks)
    manifest["verification"]["verified"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(manifest, folder)
    return manifest


def report(manifest: dict) -> str:
    """A short human-readable summary of a build."""
    verification = manifest["verification"]
    lines = [f"{manifest['model']} ({manifest['task']}), backend {manifest['backend']}, {manifest.get('precision', 'fp32')}"]
    for io in ("inputs", "outputs"):
        lines.append(f"  {io:8}" + ", ".join(f"{t['name']} {t['dtype']} {t['dims']}" for t in manifest["graph"][io]))
    for key, build in (manifest.get("tensorrt") or {}).items():
        lines.append(f"  {build['path']}: {build['bytes'] / 1e6:.1f} MB, built in {build['build_s']:.1f} s by {build['backend']} {build['version']}")
    if manifest.get("profile") and manifest.get("tensorrt"):
        lines.append("  profile: " + "; ".join(f"{name} {p['min']}..{p['max']}" for name, p in manifest["profile"].items()))
    lines.append("  checks" + ("" if verification.get("runner", manifest["backend"]) == manifest["backend"] else f" (on {verification['runner']}: the engine cannot run here)") + ":")
    for check in verification["checks"]:
        lines.append(f"    {'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    tolerance = verification["tolerance"]
    lines.append(f"  tolerance: atol {tolerance['atol']:g}, rtol {tolerance['rtol']:g} ({tolerance['why']})")
    reduced = verification.get("reduced_precision")
    if reduced:
        lines.append(f"  fp16 comparator: {reduced['metric']} (k={reduced['k']}) >= {reduced['min_fraction']:g} ({reduced['why']})")
    folder = manifest.get("folder", "")
    lines.append(f"  artifacts in {folder}/: " + ", ".join(sorted({a["path"] for a in manifest["artifacts"].values()})) + ", manifest.json")
    engine_run = verification.get("engine_run", {"ran": True})
    if not engine_run["ran"]:
        lines.append(f"  engine run SKIPPED: {engine_run['reason']}")
    lines.append("  verification " + ("PASSED" if verification["passed"] else "FAILED") + ("" if engine_run["ran"] else " (graphs on ONNX Runtime; engine built, not run)"))
    return "\n".join(lines)
