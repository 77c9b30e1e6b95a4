"""Opening a build folder, the one way: `Build.open(folder)` reads its manifest, checks every file
against its hash, and refuses a build whose verification did not pass (its engine is not to be used;
`allow_failed` is for looking into why). `build.runner(role)` gives a runner of the bare model, the
verification flavour or the production engine, opened on first use: the engine itself where it can
run here, else ONNX Runtime on the very graph it was built from."""

from __future__ import annotations

import os
from pathlib import Path

from aim.errors import AimError
from aim.layout import GraphIO, Manifest
from aim.runtime.backends import TENSORRT_BACKENDS, runnable_here
from aim.runtime.base import OnFirstUse, profile_from_io
from aim.runtime.onnxruntime import OnnxRuntimeEngine
from aim.runtime.segments import SegmentedEngine, needs_segments

ROLES = ("bare", "verification", "production")
# The TensorRT plan of each role (artifact keys, see layout.engine_files).
PLANS = {"bare": "engine.bare", "verification": "engine.verification", "production": "engine"}


class FailedBuildError(AimError):
    """A build whose recorded verification did not pass, opened to use its engine."""


class Build:
    """A build folder: its manifest (`manifest`) in `folder`, and runners for its engines."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest

    @property
    def folder(self) -> Path:
        return self.manifest.folder

    @classmethod
    def open(cls, folder: str | os.PathLike, check: bool = True, allow_failed: bool = False, warn=None) -> Build:
        """The build in `folder`. With `check`, every file it records must still have its hash (leave it
        to `check_files()` to refuse first for what the build lacks, before hashing gigabytes). A build
        that failed its verification is refused unless `allow_failed` (then `warn`, if given, is told)."""
        manifest = Manifest.load(folder)
        verification = manifest.verification
        if not verification.passed:
            failed = ", ".join(verification.failed()) or "no check ran"
            if not allow_failed:
                raise FailedBuildError(
                    f"{manifest.folder} failed its verification ({failed}): its engine is not to be used. Rebuild "
                    f"it (`make engine`), see why with `aim verify {manifest.folder}`, or run it anyway with `aim "
                    "run --allow-failed`."
                )
            if warn is not None:
                warn(f"warning: {manifest.folder} FAILED its verification ({failed}); using its engine anyway")
        build = cls(manifest)
        if check:
            build.check_files()
        return build

    def check_files(self) -> None:
        """Every file the build records must still have its hash."""
        self.manifest.check_artifacts()

    def runs_on(self) -> tuple[str, str]:
        """(the backend that runs the engines here, a note when that is not the engine's own)."""
        manifest = self.manifest
        runnable, why = runnable_here(manifest.backend)
        if runnable:
            return manifest.backend, ""
        graph = manifest.graph_path("production")
        return "onnxruntime", f"{manifest.engine} cannot run here ({why}): running {graph.name} on ONNX Runtime"

    def runner(
        self, role: str = "production", backend: str | None = None, threads: int | None = None, bounded: bool = True
    ) -> OnFirstUse:
        """A runner of `role` (bare, verification, production) opened on first use and released by
        close(), so that a caller using the roles in turn holds one engine's weights at a time.
        `backend`: the engine's own (TensorRT plans), or "onnxruntime" on the graphs (default: what runs
        here, runs_on); `threads`: ONNX Runtime's; `bounded`: refuse shapes outside the build's range."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
        manifest = self.manifest
        backend = backend or self.runs_on()[0]
        if backend in TENSORRT_BACKENDS:
            from aim.runtime.tensorrt import TensorRTEngine, engine_io

            plan = manifest.tensorrt[PLANS[role]]
            inputs, outputs = engine_io(GraphIO.of(manifest.graph_path(role)))
            return OnFirstUse(
                lambda: TensorRTEngine(manifest.folder / plan["path"], backend, inputs, outputs, plan["profile"])
            )
        path = self.graph(role)
        profile = self.profile(path) if bounded else None
        if manifest.precision == "fp16" and needs_segments(path):  # its session would not fit: in segments
            return OnFirstUse(lambda: SegmentedEngine(path, threads=threads, profile=profile))
        return OnFirstUse(lambda: OnnxRuntimeEngine(path, threads, profile=profile))

    def graph(self, role: str) -> Path:
        """The ONNX file ONNX Runtime runs for `role`: the graph, or the production engine of an ONNX
        Runtime build (its optimised model)."""
        manifest = self.manifest
        if role == "production" and manifest.backend == "onnxruntime":
            return manifest.engine_path()
        return manifest.graph_path(role)

    def profile(self, path: Path) -> dict:
        """The range of shapes a graph of the build takes: the build's dims' ranges on its inputs (the
        production engine's is the manifest's profile, the one TensorRT was built with)."""
        manifest = self.manifest
        if path == manifest.engine_path() or path == manifest.graph_path("production"):
            return manifest.profile
        return profile_from_io(GraphIO.of(path).inputs, manifest.dynamic_dims)

    def runner_for(self, path: Path, threads: int | None = None):
        """An ONNX Runtime runner for one ONNX file of the build, refusing shapes outside its range."""
        recorded = {self.folder / entry.path for entry in self.manifest.artifacts.values()}
        if Path(path) not in recorded:
            raise AimError(f"{path} is not one of the files of the build in {self.folder}")
        return OnnxRuntimeEngine(path, threads, profile=self.profile(Path(path)))


def open_runner(path: str | os.PathLike, threads: int | None = None, allow_failed: bool = False, warn=None):
    """An ONNX Runtime runner for an engine or model file, or for a build folder (its production
    engine). A build folder, or a file recorded in one, is opened through Build.open (every file
    checked against its hash; a failed build refused unless `allow_failed`, `warn` told) and its runner
    refuses shapes outside the build's range; any other file runs as it is."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not Manifest.found_in(folder):
        return OnnxRuntimeEngine(path, threads)
    build = Build.open(folder, allow_failed=allow_failed, warn=warn)
    if path.is_dir():
        return build.runner("production", "onnxruntime", threads)
    recorded = {build.folder / entry.path for entry in build.manifest.artifacts.values()}
    if path not in recorded:
        return OnnxRuntimeEngine(path, threads)
    return build.runner_for(path, threads)
