"""Opening a build folder: its manifest, its files checked against their hashes, and runners for its
engines (the engine itself where it can run here, else ONNX Runtime on the graph it was built from)."""

from __future__ import annotations

import os
from pathlib import Path

from aim.layout import GraphIO, Manifest
from aim.runtime.backends import TENSORRT_BACKENDS, runnable_here
from aim.runtime.base import OnFirstUse, profile_from_io
from aim.runtime.onnxruntime import OnnxRuntimeEngine

# The TensorRT plan of each role (artifact keys, see layout.engine_files).
PLANS = {"bare": "engine.bare", "verification": "engine.verification", "production": "engine"}


class Build:
    """A build folder: its manifest (`manifest`), in `folder`."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    @property
    def folder(self) -> Path:
        return self.manifest.folder

    @classmethod
    def open(cls, folder: str | os.PathLike, check: bool = True) -> Build:
        return cls(open_build(folder, check))


def open_build(folder: str | os.PathLike, check: bool = True) -> Manifest:
    """The manifest of a build folder; with `check`, every file it records must still have its hash."""
    manifest = Manifest.load(folder)
    if check:
        manifest.check_artifacts()
    return manifest


def role_runners(manifest: Manifest, runner: str) -> list[OnFirstUse]:
    """(bare, verification, production) runners of a build, each opened on first use and released by
    close(): a caller using them in turn holds one engine's weights at a time. `runner` is the
    backend that runs them: the engine's own, or ONNX Runtime on the very graphs a TensorRT engine was
    built from where the engine cannot run here."""
    if runner in TENSORRT_BACKENDS:
        from aim.runtime.tensorrt import TensorRTEngine, engine_io

        def plan(role):
            build = manifest.tensorrt[PLANS[role]]
            inputs, outputs = engine_io(GraphIO.of(manifest.graph_path(role)))
            return lambda: TensorRTEngine(manifest.folder / build["path"], runner, inputs, outputs, build["profile"])

        return [OnFirstUse(plan(role)) for role in ("bare", "verification", "production")]
    production = manifest.engine_path() if manifest.backend == "onnxruntime" else manifest.graph_path("production")
    paths = [manifest.graph_path("bare"), manifest.graph_path("verification"), production]
    return [
        OnFirstUse(lambda path=path: OnnxRuntimeEngine(path, profile=graph_profile(manifest, path))) for path in paths
    ]


def graph_profile(manifest: Manifest, path: Path) -> dict:
    """The range of shapes a graph of the build takes: the build's dims' ranges on its inputs (the
    production engine's is the manifest's profile, the one TensorRT was built with)."""
    if path == manifest.engine_path() or path == manifest.graph_path("production"):
        return manifest.profile
    return profile_from_io(GraphIO.of(path).inputs, manifest.dynamic_dims)


def open_runner(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime runner for an engine or model file, or for a build folder (its production
    engine). A build folder, or a file recorded in one, is opened through open_build (every file
    checked against its hash) and its runner refuses shapes outside the build's range; any other
    file runs as it is."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not Manifest.found_in(folder):
        return OnnxRuntimeEngine(path, threads)
    manifest = open_build(folder)
    if path.is_dir():
        path = manifest.engine_path() if manifest.backend == "onnxruntime" else manifest.graph_path("production")
    recorded = {manifest.folder / entry.path for entry in manifest.artifacts.values()}
    if path not in recorded:
        return OnnxRuntimeEngine(path, threads)
    return OnnxRuntimeEngine(path, threads, profile=graph_profile(manifest, path))


def production_runner(manifest: Manifest):
    """(runner, note) for a build's production engine: the engine itself where it can run, else ONNX
    Runtime on the production graph it was built from, with `note` saying why (generation, serving)."""
    runnable, why = runnable_here(manifest.backend)
    if runnable and manifest.backend in TENSORRT_BACKENDS:
        from aim.runtime.tensorrt import TensorRTEngine, engine_io

        build = manifest.tensorrt["engine"]
        inputs, outputs = engine_io(manifest.graph)
        return TensorRTEngine(manifest.engine_path(), manifest.backend, inputs, outputs, build["profile"]), ""
    if manifest.backend == "onnxruntime":
        return OnnxRuntimeEngine(manifest.engine_path(), profile=manifest.profile), ""
    graph = manifest.graph_path("production")
    return OnnxRuntimeEngine(
        graph, profile=manifest.profile
    ), f"{manifest.engine} cannot run here ({why}): running {graph.name} on ONNX Runtime"
