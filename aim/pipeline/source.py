"""What a build is made from: the `Source` protocol, and `Prepared`, what a source hands the build.

One build (pipeline/builder.py) serves every kind of source; a source only says what differs:

    FamilySource     a model family: its tiny config with random weights, or a checkpoint of it
    CheckpointSource a save_pretrained folder, built as its own architecture (model_source.py)
    OnnxSource       a user's ONNX, its dims' ranges from trtexec-style shape flags (onnx_source.py)

A source names its build folder, checks what it can before anything is written, runs its own
steps into the staging folder (load; export; the reference the engines are verified against), and
says whether a recorded build was made from it. A fourth kind is one more class with these members.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aim.layout import Source as SourceRecord
from aim.specs import DimRange
from aim.verdicts import Agreement, Quantization, Tolerance
from aim.verify.reference import Reference

if TYPE_CHECKING:
    from aim.graph_passes.quantize import Coverage
    from aim.layout import Manifest
    from aim.pipeline.progress import Progress
    from aim.pipeline.request import Resolved
    from aim.tasks import Task


@dataclass
class Prepared:
    """A source's steps done: the exported graph and the reference in the staging folder, and the
    manifest's facts that depend on the source."""

    exported: Path  # exported.onnx in the staging folder
    reference: Reference  # saved as reference.npz there
    record: SourceRecord  # the manifest's `source`
    task: Task
    logits: str  # the output the redistribution modulates
    class_axis: int  # its class axis (non-negative)
    upsample_to: str | None  # the input whose spatial size the logits are resized to, if any
    dims: dict[str, DimRange]  # every dynamic dim's range, the batch's up to the request's largest
    tolerance: Tolerance  # fp32, engine vs reference (before scaling by the logits' spread)
    fp16: Agreement | None  # FP16 builds: the comparator the engines are held to
    precision: str  # the engine's precision (a graph that is FP16 already is FP16)
    convert: str  # what the graph passes convert the graphs to ("fp32": nothing; "int4"/"int8": quantize)
    keep_fp32: tuple[str, ...] = ()  # node-name prefixes FP16 graphs keep in FP32
    tokenizer: str | None = None  # the folder generation decodes with
    max_positions: int | None = None  # text generation: the longest sequence the model was made for
    quantized: Quantization | None = None  # int4 / int8: the check against the dequantized reference
    # int4 / int8 of a PyTorch model: `exported` is quantized already (before the reference, which reads its
    # weights), and this is what was quantized
    quantization: Coverage | None = None


class Source(Protocol):
    name: str  # the build folder's name under OUT (and the manifest's model)
    steps: int  # how many numbered steps `prepare` logs
    paths: tuple  # the user's files and folders it is made from: the build folder must lie apart from them

    def check(self, request: Resolved, log) -> None:
        """Everything that can fail before anything is written (the model exists, the precision is
        possible, the files are what they claim)."""

    def prepare(self, folder: Path, request: Resolved, progress: Progress) -> Prepared:
        """The source's own steps into `folder`: exported.onnx and reference.npz, and what the manifest
        says of the source."""

    def made(self, built: Manifest, request: Resolved) -> bool:
        """Whether the build of manifest `built` was made from this source as it is now (the same
        weights, or the same file with the same output modulated)."""
