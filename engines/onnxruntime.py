"""ONNX Runtime: the embedded default engine, and the one every machine can run.

Building an "engine" means letting ONNX Runtime optimise the graph once and saving the optimised model
(extended level: fusions that stay portable across CPUs). Loading it later skips that work.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engines.runner import Runner
from errors import InvalidGraphError
from graph_passes.io import atomic_path

_NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def session_options(threads: int | None = None, level: str = "all"):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return options


def _session(path: Path, options):
    import onnxruntime as ort

    if not path.is_file():
        raise InvalidGraphError(f"{path}: no such model or engine file")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise InvalidGraphError(
            f"ONNX Runtime cannot load {path}: {str(error).strip()}. Rebuild it from a valid ONNX file."
        ) from error


def build(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, threads: int | None = None) -> Path:
    """Optimises `onnx_path` with ONNX Runtime and saves the result atomically at `engine_path`."""
    engine_path = Path(engine_path)
    with atomic_path(engine_path) as tmp:
        options = session_options(threads, level="extended")
        options.optimized_model_filepath = str(tmp)
        _session(Path(onnx_path), options)
    return engine_path


class OnnxRuntimeEngine(Runner):
    """Runs a (modulated or bare) ONNX model or a built engine, with its inputs checked first."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        self.path = Path(path)
        self.session = _session(self.path, session_options(threads))
        self.inputs = {i.name: (_NP_DTYPES.get(i.type), list(i.shape)) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

<<<<<<< HEAD
    @property
    def modulated(self) -> bool:
        return UTILITY in self.inputs and FOCUS in self.inputs

    @property
    def calibrated(self) -> bool:
        """Takes a calibrated `utility_level` in [0, 1] instead of sigma (graph_passes.calibration)."""
        from graph_passes.calibration import UTILITY_LEVEL

        return UTILITY_LEVEL in self.inputs and FOCUS in self.inputs

    @property
    def num_classes(self) -> int:
        return self.inputs[FOCUS][1][1]

    def check_feed(self, feed: dict) -> dict[str, np.ndarray]:
        """Names, dtypes, ranks and sizes against the engine's inputs; consistent dynamic dims."""
        missing = sorted(set(self.inputs) - set(feed))
        unexpected = sorted(set(feed) - set(self.inputs))
        if missing or unexpected:
            raise InvalidInputError(
                f"{self.path.name} takes inputs {sorted(self.inputs)}; "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected {unexpected}" if unexpected else "")
            )
        checked, bound = {}, {}
        for name, (dtype, dims) in self.inputs.items():
            array = np.asarray(feed[name])
            if dtype is not None and array.dtype != dtype:
                if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                    raise InvalidInputError(f"input {name!r} must be {np.dtype(dtype).name}, got {array.dtype}")
                array = array.astype(dtype)
            if array.ndim != len(dims):
                raise InvalidInputError(
                    f"input {name!r} must have rank {len(dims)} (dims {dims}), got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(dims, array.shape)):
                if isinstance(want, int) and want != got:
                    raise InvalidInputError(
                        f"input {name!r} has size {got} on axis {axis}, but this engine was built for {want} "
                        f"(dims {dims}). Reshape the input, or rebuild the engine for this model."
                    )
                if isinstance(want, str):
                    if bound.setdefault(want, (got, name))[0] != got:
                        other = bound[want][1]
                        raise InvalidInputError(
                            f"dim {want!r} is {got} in input {name!r} but {bound[want][0]} in {other!r}: they must agree"
                        )
            checked[name] = array
        return checked

    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        values = self.session.run(None, self.check_feed(feed))
        return dict(zip(self.outputs, values))

    def run(self, inputs: dict, utility=0.0, focus=None, level=None, **noise) -> np.ndarray:
        """The first output (the logits) for model `inputs` with the modulation knobs checked and
        broadcast: `utility` a number or [B], `focus` None, [C] or [B, C]. A calibrated engine takes
        `level` (a number or [B] in [0, 1]; default 1, the exact model) instead of `utility`."""
        feed = dict(inputs)
        batch = int(np.shape(next(iter(inputs.values())))[0]) if inputs else 0  # no inputs: check_feed says which
        if self.calibrated:
            from graph_passes.calibration import UTILITY_LEVEL, check_level

            if np.any(np.asarray(utility) != 0):
                raise InvalidInputError(f"{self.path.name} is calibrated: pass level= in [0, 1], not a utility sigma")
            feed[UTILITY_LEVEL] = check_level(1.0 if level is None else level, batch)
            feed[FOCUS] = check_modulation(0.0, focus, batch, self.num_classes)[1]
        elif level is not None:
            raise InvalidInputError(f"{self.path.name} is not calibrated: it takes utility (sigma), not level")
        elif not self.modulated and (np.any(np.asarray(utility) != 0) or focus is not None):
            raise InvalidInputError(f"{self.path.name} is not modulated: it has no utility or focus input")
        elif self.modulated:
            feed[UTILITY], feed[FOCUS] = check_modulation(utility, focus, batch, self.num_classes)
        feed.update(noise)
        return self.infer(feed)[self.outputs[0]]
=======
    def infer(self, feed: dict) -> dict[str, np.ndarray]:
        values = self.session.run(None, self.check_feed(feed))
        return dict(zip(self.outputs, values))
>>>>>>> main
