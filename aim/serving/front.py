"""The model Triton runs for every entry `aim triton` writes: a Python-backend model that holds the
engine itself (ONNX Runtime's session, or on a GPU the TensorRT plan) and checks every request
before the engine sees it.

    <repo>/<name>/config.pbtxt         backend "python"
    <repo>/<name>/1/model.py           `from aim.serving.front import TritonPythonModel`
    <repo>/<name>/1/model.onnx|.plan   the engine (its weights beside it)
    <repo>/<name>/1/front.json         what the front needs: role, engine, inputs, profile, classes
    <repo>/<name>/1/tiers.json         tiered entries: the tier table (key digests only)

Why the front holds the engine: were the engine a model of its own in the same server, any client
could call it with the utility of its choice. So no model of a tiered repository takes `utility`.

Roles:
- "modulated", untiered: `utility` [1] and `focus` [C] per sample, as the engine takes them;
- "modulated", tiered: no `utility` input. The sigma is the tier of the request's key (the
  Authorization header, which the server forwards as a request parameter); `focus` stays the user's
  and is optional (absent = zeros);
- "bare": the build's bare model, no knobs (the load test's baseline).
For every role the request is checked as `aim run` checks it, by the same code: the knobs by
contract.check_modulation (NaN, infinite, negative utility; NaN or infinite focus), the tensors by
the runner's check_feed (dtypes, ranks, and the build's range of shapes: an image outside it is
refused). A refusal is Triton's INVALID_ARG, a 400 over HTTP, sent before anything runs.

Requests of a dynamic batch that passed their checks run as one batch (concatenated on the batch
dim, split again), as Triton's C++ backends do.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aim.contract import FOCUS, UTILITY, check_modulation
from aim.errors import AimError, InvalidInputError

FRONT_SPEC = "front.json"
TIERS = "tiers.json"
THREADS_PARAMETER = "intra_op_thread_count"  # the parameter name Triton's C++ ONNX Runtime backend reads
ROLES = ("modulated", "bare", "text")


@dataclass
class FrontSpec:
    """What a front model needs beside its engine (written by `aim triton`, read in the server)."""

    role: str  # modulated | bare | text
    engine: str  # the engine's file name in the version folder
    backend: str  # onnxruntime | tensorrt | tensorrt-rtx
    inputs: dict[str, list]  # the engine's inputs: name -> [numpy dtype name, dims]
    outputs: list[str]
    profile: dict  # the build's range of shapes per input
    tiered: bool = False
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)  # text: tokenizer folder, max_positions

    def save(self, folder: Path) -> None:
        (Path(folder) / FRONT_SPEC).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FrontSpec:
        return cls(**json.loads((Path(folder) / FRONT_SPEC).read_text()))

    def engine_inputs(self) -> dict:
        return {name: (np.dtype(dtype).type, dims) for name, (dtype, dims) in self.inputs.items()}


def open_engine(folder: Path, spec: FrontSpec, threads: int | None = None):
    """The runner of a front's engine: ONNX Runtime, or TensorRT through Polygraphy where the plan's
    GPU is (the same runners `aim run` uses, so the same checks)."""
    path = Path(folder) / spec.engine
    if spec.backend == "onnxruntime":
        from aim.runtime.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads, profile=spec.profile)
    from aim.runtime.tensorrt import TensorRTEngine

    engine = TensorRTEngine(path, spec.backend, spec.engine_inputs(), spec.outputs, spec.profile)
    engine._start()  # load the plan now: a GPU or version that cannot run it fails the model's load, not a request
    return engine


def model_parameter(config: dict, key: str) -> str | None:
    value = (config.get("parameters") or {}).get(key)
    return None if value is None else value.get("string_value")


def authorization(parameters: dict) -> list[str]:
    """The request's Authorization values (header names are case-insensitive)."""
    from aim.serving.tiers import AUTHORIZATION

    return [str(value) for name, value in parameters.items() if name.lower() == AUTHORIZATION]


class Front:
    """One front's request handling, apart from Triton's API (so that a test can drive it)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        from aim.serving.tiers import TierTable

        folder = Path(folder)
        self.spec = FrontSpec.load(folder)
        self.engine = open_engine(folder, self.spec, threads)
        self.tiers = TierTable.load(folder / TIERS) if self.spec.tiered else None
        self.knobs = self.spec.role == "modulated"
        self.model_inputs = [name for name in self.spec.inputs if name not in (UTILITY, FOCUS)]

    def sigma(self, parameters: dict) -> float:
        """The request's sigma from its credentials. Nothing else in the request counts: a request
        parameter that names a knob or a tier is refused, so that no one takes it for a way in."""
        for name in parameters:
            if name.lower() != "authorization":
                raise InvalidInputError(
                    f"request parameter {name!r} is not taken: the utility comes from the key in the "
                    "Authorization header (Bearer KEY), nothing else in a request sets it"
                )
        return self.tiers.sigma(self.tiers.tier_of(authorization(parameters)))

    def feed(self, arrays: dict[str, np.ndarray], parameters: dict) -> dict[str, np.ndarray]:
        """The engine's feed for one request, checked as `aim run` checks it (InvalidInputError)."""
        feed = {name: arrays[name] for name in self.model_inputs if name in arrays}
        missing = [name for name in self.model_inputs if name not in feed]
        if missing:
            raise InvalidInputError(f"input {missing[0]!r} is missing")
        batch = int(np.shape(next(iter(feed.values())))[0]) if feed else 0
        if self.knobs:
            if self.tiers is not None:
                utility = self.sigma(parameters)
            elif UTILITY not in arrays:
                raise InvalidInputError("input 'utility' is missing")
            else:
                utility = np.asarray(arrays[UTILITY]).reshape(-1)
            focus = arrays.get(FOCUS)
            feed[UTILITY], feed[FOCUS] = check_modulation(utility, focus, batch, self.spec.num_classes)
        return self.engine.check_feed(feed)

    def run(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Checked feeds run as one batch; each request gets its own rows back."""
        batch = feeds[0] if len(feeds) == 1 else {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
        results = self.engine.infer(batch)
        sizes = np.cumsum([0] + [len(next(iter(f.values()))) for f in feeds])
        return [
            {name: results[name][start:stop] for name in self.spec.outputs} for start, stop in zip(sizes, sizes[1:])
        ]


class TritonPythonModel:
    """Triton's entry points (the Python backend calls initialize, execute, finalize)."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = model_parameter(config, THREADS_PARAMETER)
        folder = Path(args["model_repository"]) / args["model_version"]
        self.front = Front(folder, int(threads) if threads else None)

    def execute(self, requests):
        from aim.serving.stub import error_response, input_arrays, output_tensor, parameters, pb

        responses, feeds = [None] * len(requests), {}
        for index, request in enumerate(requests):
            try:
                feeds[index] = self.front.feed(input_arrays(request), parameters(request))
            except Exception as error:  # noqa: BLE001 - told to that client (400 for its mistakes), the others go on
                responses[index] = error_response(
                    error if isinstance(error, AimError) else InvalidInputError(f"malformed request: {error}")
                )
        groups = {}  # requests whose non-batch shapes agree run as one batch
        for index, feed in feeds.items():
            groups.setdefault(tuple((name, array.shape[1:]) for name, array in feed.items()), []).append(index)
        for members in groups.values():
            try:
                outputs = self.front.run([feeds[i] for i in members])
            except Exception:  # noqa: BLE001 - one request must not fail the batch: run each alone
                outputs = []
                for i in members:
                    try:
                        outputs.append(self.front.run([feeds[i]])[0])
                    except Exception as error:  # noqa: BLE001
                        outputs.append(error)
            for index, result in zip(members, outputs):
                if isinstance(result, BaseException):
                    responses[index] = error_response(result)
                else:
                    tensors = [output_tensor(name, array) for name, array in result.items()]
                    responses[index] = pb().InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self):
        self.front.engine.close()
