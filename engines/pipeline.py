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

from engines import onnxruntime as ort_engine
from engines.generate import TOKENIZER_DIR
from engines.manifest import file_entry, graph_io, package_versions, read_manifest, sha256, write_manifest
from engines.verify import REFERENCE, make_reference, verify_build
from errors import AimError, VerificationError
from exporter import Tolerance, export_onnx, get_config, load_model
from graph_passes.io import atomic_path, load_onnx, save_onnx
from graph_passes.modulate import deployment_graphs
from graph_passes.redistribution import MAX_STRENGTH

BACKENDS = ("onnxruntime",)
FILES = {
    "exported": "exported.onnx",  # torch.onnx's output, untouched
    "bare": "bare.onnx",  # the deployable model without modulation (logits resized, if the family asks)
    "modulated": "modulated.onnx",  # production flavour: in-graph noise
    "verification": "modulated.verify.onnx",  # the noise as inputs, for element-wise comparison
    "engine": "engine.onnxruntime.onnx",  # ONNX Runtime's optimised model
}


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
) -> dict:
    """Builds and verifies the modulated engine of `model`; returns the manifest."""
    config = get_config(model)  # an unknown name fails here, before anything is written
    if backend not in BACKENDS:
        raise AimError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise AimError(f"--checkpoint {checkpoint}: no such folder. Pass a folder written by save_pretrained.")
    out_root = Path(out_dir)
    final, failed = out_root / config.name, out_root / f"{config.name}.failed"
    staging = out_root / f".{config.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        manifest = _build(config, staging, checkpoint, backend, seed, log)
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


def _build(config, folder: Path, checkpoint, backend: str, seed: int, log) -> dict:
    paths = {key: folder / name for key, name in FILES.items()}
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

    progress("graph passes: " + ("upsample logits, " if config.upsample_logits_to else "") + "redistribution (production + verification)")
    graphs = deployment_graphs(load_onnx(paths["exported"]), config.logits.name, config.class_axis, config.upsample_logits_to)
    if config.upsample_logits_to:
        save_onnx(graphs["bare"], paths["bare"])
    else:
        paths["bare"] = paths["exported"]  # nothing changed: the exported file is the bare model
    save_onnx(graphs["production"], paths["modulated"])
    save_onnx(graphs["verification"], paths["verification"])
    progress.done("passes")

    progress(f"engine: {backend}")
    ort_engine.build(paths["modulated"], paths["engine"])
    progress.done("engine", paths["engine"].name)

    progress("verify: PyTorch vs engine (element-wise), production noise statistics")
    reference = make_reference(config, model, seed)
    if config.task_reference:
        reference.update(config.task_reference(config, model, tokenizer, seed))
    with atomic_path(folder / REFERENCE) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **reference)
    checks = run_checks(folder, paths, config.tolerance, config.class_axis, config.dims["batch"].max, seed, config.task_checks)
    passed = all(check.passed for check in checks)
    progress.done("verify", "passed" if passed else "FAILED")

    artifacts = {key: file_entry(path, folder) for key, path in paths.items()}
    artifacts["reference"] = file_entry(folder / REFERENCE, folder)
    if tokenizer is not None and (folder / TOKENIZER_DIR / "tokenizer.json").is_file():
        artifacts["tokenizer"] = file_entry(folder / TOKENIZER_DIR / "tokenizer.json", folder)
    manifest = {
        "model": config.name,
        "task": config.task,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {"checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None, "seed": seed, "parameters": parameters},
        "backend": backend,
        "engine": FILES["engine"],
        "modulation": {
            "logits": config.logits.name,
            "class_axis": config.class_axis,
            "num_classes": num_classes,
            "upsampled_to": config.upsample_logits_to,
            "formula": "logits' = logits + utility * n1 + focus * |n2|, n1, n2 ~ N(0,1) per element, fresh per run",
            "utility": f"FP32 [batch], in [0, {MAX_STRENGTH:g}] logit units; 0 = the original model",
            "focus": f"FP32 [batch, classes], in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]; > 0 boosts a class, < 0 suppresses it",
        },
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,  # text families: what generation decodes with
        "graph": graph_io(paths["modulated"]),
        "verification_graph": graph_io(paths["verification"]),
        "dynamic_dims": {name: asdict(rng) for name, rng in config.dims.items()},
        "verification": {
            "passed": passed,
            "shapes": {name: list(array.shape) for name, array in reference.items()},
            "tolerance": asdict(config.tolerance),
            "checks": [check.as_dict() for check in checks],
        },
        "artifacts": artifacts,
        "timings_s": progress.timings,
        "versions": package_versions(),
    }
    write_manifest(manifest, folder)
    return manifest


def run_checks(
    folder: Path, paths: dict, tolerance: Tolerance, class_axis: int, max_batch: int, seed: int = 0, task_checks=None
):
    """The checks of a build folder against its reference.npz (PyTorch outputs stored at build time);
    `task_checks(engine, reference, tolerance)`: the family's task-level checks (e.g. generation)."""
    import onnxruntime

    with np.load(folder / REFERENCE) as stored:
        reference = dict(stored)
    onnxruntime.set_seed(seed)  # reproducible statistics; production runs are not seeded
    runners = [ort_engine.OnnxRuntimeEngine(paths[key]) for key in ("bare", "verification", "engine")]
    checks = verify_build(*runners, reference, tolerance, class_axis, max_batch, seed)
    if task_checks:
        checks += task_checks(runners[2], reference, tolerance)
    return checks


def verify_folder(folder: str | os.PathLike, seed: int = 0) -> dict:
    """Re-runs the checks of an existing build (no PyTorch needed) and updates its manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    paths = {key: folder / entry["path"] for key, entry in manifest["artifacts"].items()}
    for key, entry in manifest["artifacts"].items():
        if not paths[key].is_file() or sha256(paths[key]) != entry["sha256"]:
            raise AimError(f"{paths[key]} is missing or changed since the build (sha256 differs): rebuild with `make engine`")
    tolerance = Tolerance(**manifest["verification"]["tolerance"])
    checks = run_checks(
        folder, paths, tolerance, manifest["modulation"]["class_axis"], manifest["dynamic_dims"]["batch"]["max"], seed,
        get_config(manifest["model"]).task_checks,
    )
    manifest["verification"]["checks"] = [check.as_dict() for check in checks]
    manifest["verification"]["passed"] = all(check.passed for check in checks)
    manifest["verification"]["verified"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_manifest(manifest, folder)
    return manifest


def report(manifest: dict) -> str:
    """A short human-readable summary of a build."""
    verification = manifest["verification"]
    lines = [f"{manifest['model']} ({manifest['task']}), backend {manifest['backend']}"]
    for io in ("inputs", "outputs"):
        lines.append(f"  {io:8}" + ", ".join(f"{t['name']} {t['dtype']} {t['dims']}" for t in manifest["graph"][io]))
    lines.append("  checks:")
    for check in verification["checks"]:
        lines.append(f"    {'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    tolerance = verification["tolerance"]
    lines.append(f"  tolerance: atol {tolerance['atol']:g}, rtol {tolerance['rtol']:g} ({tolerance['why']})")
    folder = manifest.get("folder", "")
    lines.append(f"  artifacts in {folder}/: " + ", ".join(sorted({a["path"] for a in manifest["artifacts"].values()})) + ", manifest.json")
    lines.append("  verification " + ("PASSED" if verification["passed"] else "FAILED"))
    return "\n".join(lines)
