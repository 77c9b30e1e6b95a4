"""The build folder: its file names, and the manifest that describes it.

`Manifest` is the only code that reads or writes manifest.json. The file carries a schema number;
a folder written by another schema is refused with a message that says to rebuild it. It also
carries its own digest (sha256 of the rest of its content), so a hand-edited manifest (a tolerance
raised to 1e9, a hash replaced, a wider profile) is refused instead of obeyed.

    build/<model>/
      exported.onnx             torch.onnx's trace (or the user's own ONNX)
      exported.onnx.data        its weights, past 2 GiB: every FP32 graph below refers to this one file
      bare.onnx                 the deployable model without modulation (logits resized, if asked)
      modulated.onnx            production flavour: inputs utility, focus; noise drawn in the graph
      modulated.verify.onnx     verification flavour: the noise tensors are inputs too
      *.fp16.onnx               FP16 builds: the graphs in FP16 (weights.fp16.data: their weights, shared)
      engine.<backend>...       the engine (ONNX Runtime's optimised model (+ .data), or TensorRT plans)
      reference.npz             inputs, knobs, noise and the reference outputs verified against
      tokenizer/                text generation: the tokenizer generation decodes with
      manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from aim.errors import AimError
from aim.files import atomic_path, read_json, sha256
from aim.specs import DimRange
from aim.verdicts import Agreement, Check, Quantization, Tolerance

SCHEMA = 3  # bumped when the manifest's structure changes; older folders are refused (rebuild)
MANIFEST = "manifest.json"
REFERENCE = "reference.npz"
TOKENIZER_DIR = "tokenizer"
EVAL_DIR = "eval"
ATTACK_DIR = "attack"  # make attack: attack.csv, attack.png, summary.json
FILES = {
    "exported": "exported.onnx",  # torch.onnx's output, untouched
    "bare": "bare.onnx",  # the deployable model without modulation (logits resized, if the task asks)
    "modulated": "modulated.onnx",  # production flavour: in-graph noise
    "verification": "modulated.verify.onnx",  # the noise as inputs, for element-wise comparison
    "engine": "engine.onnxruntime.onnx",  # ONNX Runtime's optimised model
    # External data (aim/weights.py): the exported weights, which the bare, production and verification
    # graphs share; the FP16 graphs' weights, shared likewise; the ONNX Runtime engine's own.
    "weights": "exported.onnx.data",
    "weights.fp16": "weights.fp16.data",
    "weights.int4": "weights.int4.data",  # int4 / int8 builds: the MatMulNBits weights and every other weight
    "weights.int8": "weights.int8.data",
    "engine.data": "engine.onnxruntime.onnx.data",
}
CALIBRATION_FILES = {
    "calibration": "calibration.json",
    "calibrated": "modulated.calibrated.onnx",
    "calibrated_engine": "engine.calibrated.onnxruntime.onnx",
}
# Which graph each engine runs (artifact keys): the bare model, the verification flavour, production.
ROLES = {"bare": "bare", "verification": "verification", "production": "modulated"}
PACKAGES = (
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnx-graphsurgeon",
    "polygraphy",
    "optimum",
    "numpy",
    "scipy",
)


def engine_files(backend: str) -> dict[str, str]:
    """Engine artifacts of a backend: ONNX Runtime has one (the graphs run as they are); TensorRT has a
    plan per graph, since the differential checks run the bare and verification graphs as engines too."""
    if backend == "onnxruntime":
        return {"engine": FILES["engine"]}
    return {
        "engine": f"engine.{backend}.plan",
        "engine.bare": f"bare.{backend}.plan",
        "engine.verification": f"modulated.verify.{backend}.plan",
    }


class ManifestError(AimError):
    """manifest.json is missing, unreadable, of another schema, or edited since it was written."""


def digest(data: dict) -> str:
    """sha256 of a manifest's content: every key but "digest", as canonical JSON."""
    body = {key: value for key, value in data.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sealed(data: dict) -> dict:
    """The manifest's content with its digest, as manifest.json holds it."""
    return {**data, "digest": digest(data)}


@dataclass
class Tensor:
    name: str
    dtype: str  # numpy's name: float32, int64, ...
    dims: list  # ints (static) or names (dynamic); None where unknown


@dataclass
class GraphIO:
    inputs: list[Tensor]
    outputs: list[Tensor]

    @classmethod
    def of(cls, path: str | os.PathLike) -> GraphIO:
        """Inputs and outputs of an ONNX file: name, element type, dims (ints or symbolic names).
        Reads the graph only, never external weights."""
        import onnx

        return cls.of_model(onnx.load(str(path), load_external_data=False))

    @classmethod
    def of_model(cls, model) -> GraphIO:
        """Inputs and outputs of an onnx.ModelProto (see `of`)."""
        import onnx

        graph = model.graph
        initializers = {init.name for init in graph.initializer}

        def describe(value):
            tensor = value.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
            return Tensor(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims)

        return cls(
            [describe(v) for v in graph.input if v.name not in initializers], [describe(v) for v in graph.output]
        )

    def input(self, name: str) -> Tensor | None:
        return next((t for t in self.inputs if t.name == name), None)

    def signature(self) -> dict:
        """{"inputs"|"outputs": {name: (dtype, dims)}}: for comparing two graphs' IO."""
        return {key: {t.name: (t.dtype, list(t.dims)) for t in getattr(self, key)} for key in ("inputs", "outputs")}

    @classmethod
    def from_dict(cls, data: dict) -> GraphIO:
        return cls([Tensor(**t) for t in data["inputs"]], [Tensor(**t) for t in data["outputs"]])


@dataclass
class Artifact:
    path: str  # relative to the build folder
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: Path, root: Path) -> Artifact:
        return cls(str(path.relative_to(root)), path.stat().st_size, sha256(path))


@dataclass
class Source:
    checkpoint: str | None  # absolute path of the checkpoint folder; None for random weights
    seed: int
    parameters: int
    # A user's own ONNX (`aim engine --onnx`): its absolute path and sha256, the shape flags that gave
    # its dims' ranges ({"min"|"opt"|"max": "name:1x3x224x224,..."}) and the --inputs file, if any.
    onnx: str | None = None
    onnx_sha256: str | None = None
    shapes: dict | None = None
    inputs: dict | None = None  # {"path", "sha256"} of the verification inputs given as .npz
    dtype: str | None = (
        None  # how the checkpoint stores its weights (bfloat16, float16, float32); None for random weights
    )
    model_class: str | None = None  # the transformers class that loaded the model (its architecture)
    files: dict[str, str] = field(default_factory=dict)  # the checkpoint's files: name -> sha256


@dataclass
class Modulation:
    logits: str
    class_axis: int
    num_classes: int
    upsampled_to: str | None
    formula: str
    utility: str
    focus: str
    fp32_nodes: str
    noise: str = "fresh"  # contract.NOISE_SOURCES: fresh per run, or keyed
    key_fingerprint: str | None = None  # keyed: which key (graph_passes/noise_key.py), never the key


@dataclass
class EngineRun:
    ran: bool
    reason: str = ""


@dataclass
class Verification:
    passed: bool
    runner: str  # the backend that ran the checks
    engine_run: EngineRun
    shapes: dict
    tolerance: Tolerance
    reduced_precision: Agreement | None
    checks: list[Check]
    seed: int = 0
    verified: str | None = None  # when `aim verify` last re-ran the checks
    logit_spread: float | None = None  # of the reference logits: sets the fp32 tolerance (verify/tolerance.py)
    quantized: Quantization | None = None  # int4 / int8 builds: the check against the dequantized reference

    @classmethod
    def from_dict(cls, data: dict) -> Verification:
        reduced, quantized = data.get("reduced_precision"), data.get("quantized")
        return cls(
            passed=data["passed"],
            runner=data["runner"],
            engine_run=EngineRun(**data["engine_run"]),
            shapes=data["shapes"],
            tolerance=Tolerance(**data["tolerance"]),
            reduced_precision=Agreement(**reduced) if reduced else None,
            checks=[Check(**c) for c in data["checks"]],
            seed=data.get("seed", 0),
            verified=data.get("verified"),
            logit_spread=data.get("logit_spread"),
            quantized=Quantization(**quantized) if quantized else None,
        )

    def failed(self) -> list[str]:
        return [check.name for check in self.checks if not check.passed]


@dataclass
class Manifest:
    """What was built, from what, with which packages, and how it was verified."""

    model: str
    task: str
    created: str
    source: Source
    backend: str
    precision: str
    engine: str  # the production engine's file
    graphs: dict[str, str]  # role (bare, verification, production) -> artifact key of the graph it runs
    modulation: Modulation
    tokenizer: str | None  # text generation: the folder generation decodes with
    graph: GraphIO  # the production engine's inputs and outputs
    verification_graph: GraphIO
    dynamic_dims: dict[str, DimRange]
    # min/opt/max shape of every production input: TensorRT's optimization profile (enforced by
    # TensorRT engines and their runner; for ONNX Runtime the range the build was made for).
    profile: dict[str, dict[str, list[int]]]
    tensorrt: dict | None  # per plan: size, build time, version, profile
    compatibility: dict  # per graph: the TensorRT operator check's findings
    verification: Verification
    artifacts: dict[str, Artifact]
    timings_s: dict[str, float]
    versions: dict[str, str]
    calibration: dict | None = None
    schema: int = SCHEMA
    folder: Path | None = field(default=None, compare=False)  # where it was read from or written to
    # Per step of the build: resident memory (MB) at its start and at its peak (Linux; else empty).
    memory_mb: dict[str, dict[str, float]] = field(default_factory=dict)
    # Text generation: the positions the model was made for (prompt and new tokens); generation refuses more.
    max_positions: int | None = None
    # int4 / int8 builds: what was quantized (graph_passes/quantize.Coverage: bits, block, MatMuls, bytes).
    quantization: dict | None = None

    # -- files

    def path(self, key: str) -> Path:
        """Absolute path of an artifact by key."""
        return self._root() / self.artifacts[key].path

    def graph_path(self, role: str) -> Path:
        """The graph a role's engine runs: bare, verification or production."""
        return self.path(self.graphs[role])

    def engine_path(self) -> Path:
        return self._root() / self.engine

    def record(self, key: str, path: Path) -> None:
        """Adds (or refreshes) an artifact entry for a file inside the build folder."""
        self.artifacts[key] = Artifact.of(path, self._root())

    def changed_artifacts(self) -> list[str]:
        """Artifacts that are missing or whose bytes differ from the build's sha256."""
        changed = []
        for entry in self.artifacts.values():
            path = self._root() / entry.path
            if not path.is_file() or path.stat().st_size != entry.bytes or sha256(path) != entry.sha256:
                changed.append(entry.path)
        return changed

    def check_artifacts(self) -> None:
        changed = self.changed_artifacts()
        if changed:
            raise ManifestError(
                f"{', '.join(changed)} in {self._root()} {'is' if len(changed) == 1 else 'are'} missing or "
                "changed since the "
                f"build (sha256 differs from the manifest): rebuild with `make engine`"
            )

    @property
    def file(self) -> Path:
        """manifest.json of this build folder."""
        return self._root() / MANIFEST

    def _root(self) -> Path:
        if self.folder is None:
            raise ValueError("the manifest has no folder yet: save() or load() it first")
        return self.folder

    # -- JSON

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("folder")
        return {"schema": data.pop("schema"), **data}

    @classmethod
    def from_dict(cls, data: dict, folder: Path | None = None) -> Manifest:
        return cls(
            model=data["model"],
            task=data["task"],
            created=data["created"],
            source=Source(**data["source"]),
            backend=data["backend"],
            precision=data["precision"],
            engine=data["engine"],
            graphs=data["graphs"],
            modulation=Modulation(**data["modulation"]),
            tokenizer=data.get("tokenizer"),
            graph=GraphIO.from_dict(data["graph"]),
            verification_graph=GraphIO.from_dict(data["verification_graph"]),
            dynamic_dims={name: DimRange(**r) for name, r in data["dynamic_dims"].items()},
            profile=data["profile"],
            tensorrt=data.get("tensorrt"),
            compatibility=data.get("compatibility", {}),
            verification=Verification.from_dict(data["verification"]),
            artifacts={key: Artifact(**a) for key, a in data["artifacts"].items()},
            timings_s=data.get("timings_s", {}),
            versions=data.get("versions", {}),
            calibration=data.get("calibration"),
            schema=data["schema"],
            folder=folder,
            memory_mb=data.get("memory_mb", {}),
            max_positions=data.get("max_positions"),
            quantization=data.get("quantization"),
        )

    def save(self, folder: str | os.PathLike | None = None) -> Path:
        if folder is not None:
            self.folder = Path(folder)
        path = self.file
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(sealed(self.to_dict()), indent=2) + "\n")
        return path

    @staticmethod
    def found_in(folder: str | os.PathLike) -> bool:
        """Whether `folder` is a build folder (it has a manifest, readable or not)."""
        return (Path(folder) / MANIFEST).is_file()

    @staticmethod
    def holds_build(folder: str | os.PathLike) -> bool:
        """Whether `folder` holds this project's build manifest (of any schema, edited or not): the only
        folders a build may replace (files.StagedFolder). A user's folder, even one with another
        program's manifest.json, is not one."""
        try:
            data = json.loads((Path(folder) / MANIFEST).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(data, dict) and {"model", "artifacts", "verification"} <= data.keys()

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Manifest:
        folder = Path(folder)
        path = folder / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{folder}: no build there (no {MANIFEST}). Build one first: `make engine MODEL=...`")
        data = read_json(path, ManifestError, "rebuild the folder with `make engine`")
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema", "none") if isinstance(data, dict) else "none"
            raise ManifestError(
                f"{path} was written by another version of this tool (manifest schema {found}, this one reads "
                f"{SCHEMA}): rebuild the folder with `make engine`"
            )
        if data.get("digest") != digest(data):
            raise ManifestError(
                f"{path} was edited after it was written (its content does not match its digest): a build's record "
                f"(tolerances, hashes, ranges) is not to be changed by hand. Rebuild the folder with `make engine`."
            )
        try:
            return cls.from_dict(data, folder)
        except (KeyError, TypeError, ValueError) as error:
            raise ManifestError(
                f"{path} is incomplete or malformed ({type(error).__name__}: {error}): rebuild the folder with "
                "`make engine`"
            ) from None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
