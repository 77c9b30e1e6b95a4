"""Running an ONNX graph in segments, one ONNX Runtime session at a time, so that at most one segment's
weights are in memory: how an FP16 graph too large for the CPU is verified (issue 23).

ONNX Runtime's CPU provider has no FP16 MatMul: it inserts Casts and keeps an FP32 copy of every FP16
weight when a session is created (a 7B FP16 graph would take 29 GB). Here the graph is read without its
weights, its nodes (in a topological order, sunk as late as they can go) are cut into contiguous runs of
at most `budget` bytes of initializers, and each run becomes a model of its own whose initializers are
the same references into the same weights file (written beside it under a temporary name). A run reads
what the graph's inputs and earlier runs made, and hands on what later runs or the graph's outputs read;
its session is released (arena off, then malloc_trim) before the next one opens. Nothing here knows
layers: any graph is cut, every family's and a user's.

`run_calls` is segment-major: several calls (a prefill and teacher-forced decode steps, whose every input
is known beforehand but the cache) go through each segment while its session is open, call t's past
being call t-1's present made by the same segment. Results are not bit-identical to one session's
(ONNX Runtime fuses across what is one graph; at a cut it cannot): they differ by FP16 rounding, so the
exact checks compare graphs under the same segmentation.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from aim.runtime.base import Runner

_PAST, _PRESENT = "past_key_values.", "present."
WEIGHT_BYTES = 1024  # an initializer this large counts toward a segment's budget (as the weights file's)
KEEP_BYTES = 16 * 2**20  # a segment with fewer weights stays open across calls
SEGMENT_MB = 1024  # weights per segment: ~3x that resident while its session is open (FP16 upcast to FP32)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def reads(node: onnx.NodeProto) -> list[str]:
    """The names `node` reads, those its subgraphs read from the outer scope included."""
    names = [name for name in node.input if name]
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names += reads(inner)
    return names


def sink(model: onnx.ModelProto) -> None:
    """Reorders the nodes so that each comes just before its first reader (still topological), so a node
    runs in the segment of the layer that uses it: torch.onnx casts every layer's past at the top of the
    graph, which would tie the first segment to every layer. The order is a depth-first walk from the
    graph's outputs in their order (then from any node left), taking a node's inputs in their order: the
    same model part gets the same order in the bare graph and in a modulated one, whose redistribution
    only reads the logits, so both are cut alike and the exact checks compare like with like.
    Shape(Cast(x)) reads Shape(x) first, so that a shape read does not pull a cast forward."""
    nodes = list(model.graph.node)
    made_by = {output: node for node in nodes for output in node.output}
    for node in nodes:
        while node.op_type == "Shape" and node.input[0] in made_by and made_by[node.input[0]].op_type == "Cast":
            node.input[0] = made_by[node.input[0]].input[0]
    producer = {output: index for index, node in enumerate(nodes) for output in node.output}

    def inputs_of(index: int) -> list[int]:
        return list(dict.fromkeys(producer[name] for name in reads(nodes[index]) if name in producer))

    order, seen = [], [False] * len(nodes)
    roots = [producer[output.name] for output in model.graph.output if output.name in producer]
    for root in [*roots, *range(len(nodes))]:
        if seen[root]:
            continue
        seen[root] = True
        stack = [(root, iter(inputs_of(root)))]
        while stack:  # iterative: a 7B graph's chains are deeper than Python's recursion limit
            index, pending = stack[-1]
            for source in pending:
                if not seen[source]:
                    seen[source] = True
                    stack.append((source, iter(inputs_of(source))))
                    break
            else:
                stack.pop()
                order.append(index)
    # A node nothing reads (a present's cast, the logits' last node) goes right after its last input, in
    # its layer's segment: segment-major decoding takes a call's past from the same segment's present.
    read = {source for index in range(len(nodes)) for source in inputs_of(index)}
    position = {index: rank for rank, index in enumerate(i for i in order if i in read)}
    for index in order:
        if index not in read:
            position[index] = max((position[source] for source in inputs_of(index)), default=-1) + 0.5
    order.sort(key=lambda index: position[index])  # stable: terminals after one node keep the walk's order
    model.graph.ClearField("node")
    model.graph.node.extend(nodes[index] for index in order)


def plan(model: onnx.ModelProto, budget: int) -> list[list[int]]:
    """Node indices per segment: contiguous, each with at most `budget` bytes of initializers (a node whose
    own weights exceed it gets a segment alone, with the weightless nodes before it)."""
    sizes = {tensor.name: tensor_bytes(tensor) for tensor in model.graph.initializer}
    sizes = {name: size for name, size in sizes.items() if size >= WEIGHT_BYTES}  # scalars and shapes cut nothing
    segments, current, used, seen = [], [], 0, set()
    for index, node in enumerate(model.graph.node):
        names = set(reads(node))
        weight = sum(sizes[name] for name in names if name in sizes and name not in seen)
        if used and used + weight > budget:  # a weightless prefix (a modulated graph's input checks) cuts nothing
            segments.append(current)
            current, used, seen = [], 0, set()
        current.append(index)
        used += weight
        seen |= names & sizes.keys()
    return segments + [current] if current else segments


class Segmented:
    """The graph at `path` cut into segments of at most `budget_mb` MB of weights each."""

    def __init__(self, path: str | os.PathLike, budget_mb: float = 1024, threads: int | None = None):
        self.path = Path(path)
        self.kept: dict[int, tuple] = {}  # segment -> (session, inputs, outputs), for segments kept open
        self._signatures: dict[int, tuple | None] = {}
        self.model = onnx.load(str(self.path), load_external_data=False)
        sink(self.model)
        inferred = onnx.shape_inference.infer_shapes(self.model)
        graph = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
        self.segments = plan(self.model, int(budget_mb * 2**20))
        self.outputs = [output.name for output in self.model.graph.output]
        self.threads = threads
        self.last_reader: dict[str, int] = {}
        for number, indices in enumerate(self.segments):
            for index in indices:
                for name in reads(self.model.graph.node[index]):
                    self.last_reader[name] = number

    def _segment(self, number: int, available: set[str]) -> tuple[onnx.ModelProto, list[str], list[str]]:
        graph = self.model.graph
        nodes = [graph.node[index] for index in self.segments[number]]
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        made = {output for node in nodes for output in node.output}
        read = list(dict.fromkeys(name for node in nodes for name in reads(node)))
        inputs = [name for name in read if name not in made and name not in initializers and name in available]
        later = {name for name, last in self.last_reader.items() if last > number} | set(self.outputs)
        outputs = [output for node in nodes for output in node.output if output in later]
        value = helper.make_tensor_value_info
        model = helper.make_model(
            helper.make_graph(
                nodes,
                f"segment_{number}",
                [value(name, self.types.get(name, 0), None) for name in inputs],
                [value(name, self.types.get(name, 0), None) for name in outputs],
                initializer=[initializers[name] for name in read if name in initializers],
            ),
            opset_imports=self.model.opset_import,
            ir_version=self.model.ir_version,
        )
        return model, inputs, outputs

    def _session(self, model: onnx.ModelProto):
        """A session of one segment, its model written beside the weights (where its references resolve)
        under a temporary name, removed once the session holds it."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.enable_cpu_mem_arena = False  # a released session's memory goes back, not to an arena
        options.log_severity_level = 3
        if self.threads:
            options.intra_op_num_threads = self.threads
        temporary = self.path.with_name(f".{self.path.stem}.segment-{os.getpid()}.onnx")
        onnx.save(model, str(temporary))
        try:
            return ort.InferenceSession(str(temporary), options, providers=["CPUExecutionProvider"])
        finally:
            temporary.unlink(missing_ok=True)

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call through every segment in turn: the graph's outputs."""
        return self.run_calls([feed])[0]

    def run_calls(self, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Calls in order, segment-major: each segment's session opens once and runs every call. A call
        without a `past_key_values.*` input the feed lacks takes the previous call's `present.*` (made by
        the same segment, so already there); a segment that reads a later layer's past only for its shape
        gets zeros of that shape."""
        live = [dict(feed) for feed in feeds]
        for number in range(len(self.segments)):
            if number in self.kept:
                session, inputs, outputs = self.kept[number]
            else:
                available = set(live[0]) | {
                    _PAST + name[len(_PRESENT) :] for name in self.outputs if name.startswith(_PRESENT)
                }
                (model, inputs, outputs), session = self._segment(number, available), None
            for step, values in enumerate(live):
                feed = {
                    name: values[name] if name in values else self._past(name, live, step, number) for name in inputs
                }
                key = self._key(number, feed)
                found = _MEMO.get(key) if key is not None else None
                if found is None:  # computed here: the session opens at the first call that needs it
                    if session is None:
                        session = self._session(model)
                        if self._keep(model):
                            self.kept[number] = session, inputs, outputs
                    found = dict(zip(outputs, session.run(outputs, feed)))
                    if key is not None:
                        _remember(key, found)
                values.update(found)
            if number not in self.kept and session is not None:
                session = None
                _trim()
            for values in live:  # what no later segment reads and no one asked for
                for name in [name for name in values if self.last_reader.get(name, -1) <= number]:
                    if name not in self.outputs:
                        del values[name]
        return [{name: values[name] for name in self.outputs} for values in live]

    def _key(self, number: int, values: dict) -> tuple | None:
        """What a segment's outputs depend on: its nodes, its weights file and the values it is fed (None
        for a segment that draws random numbers, whose outputs must not be remembered). Two graphs with
        the same nodes (the bare graph and the modulated graph's model part) share what they computed."""
        if number not in self._signatures:
            graph = self.model.graph
            nodes = [graph.node[index] for index in self.segments[number]]
            if any(
                op.startswith("Random") for node in nodes for op in _op_types(helper.make_graph([node], "", [], []))
            ):
                self._signatures[number] = None
            else:
                digest = hashlib.sha256(str(self.path.parent.resolve()).encode())
                for location in sorted(self._data_files()):  # which weights: a rebuild writes new files
                    status = (self.path.parent / location).stat()
                    digest.update(f"{location}{status.st_ino}{status.st_size}{status.st_mtime_ns}".encode())
                for node in nodes:  # what it computes, not how a tool wrote it (names, doc strings, metadata)
                    digest.update(f"{node.op_type}|{node.domain}|{list(node.input)}|{list(node.output)}".encode())
                    for attribute in node.attribute:
                        digest.update(attribute.SerializeToString())
                reads_ = sorted({name for node in nodes for name in reads(node)})
                self._signatures[number] = (digest.hexdigest(), reads_)
        signature = self._signatures[number]
        if signature is None:
            return None
        digest = hashlib.sha256(signature[0].encode())
        for name in signature[1]:
            if name in values:
                array = np.ascontiguousarray(values[name])
                digest.update(f"{name}{array.dtype}{array.shape}".encode())
                if array.size:
                    digest.update(memoryview(array.reshape(-1)).cast("B"))
        return (digest.hexdigest(),)

    def _data_files(self) -> set[str]:
        external = onnx.external_data_helper.uses_external_data
        return {
            entry.value
            for tensor in self.model.graph.initializer
            if external(tensor)
            for entry in tensor.external_data
            if entry.key == "location"
        }

    def _keep(self, model: onnx.ModelProto) -> bool:
        """Whether a segment's session stays open across calls: one that draws random numbers (its stream
        must go on, not restart from the seed at every call), or one with hardly any weights."""
        random = any(op.startswith("Random") for op in _op_types(model.graph))
        return random or sum(tensor_bytes(tensor) for tensor in model.graph.initializer) < KEEP_BYTES

    def close(self) -> None:
        self.kept.clear()
        _trim()

    def _past(self, name: str, live: list[dict], step: int, number: int) -> np.ndarray:
        """Call `step`'s past `name`: the previous call's present; or, where this segment reads it only for
        its shape (its layer comes later), zeros of that shape."""
        present = _PRESENT + name[len(_PAST) :]
        if step and present in live[step - 1]:
            return live[step - 1][present]
        graph = self.model.graph
        readers = [graph.node[index] for index in self.segments[number] if name in reads(graph.node[index])]
        if step == 0 or any(node.op_type != "Shape" for node in readers):
            raise ValueError(f"call {step} lacks {name!r}, which no earlier call of this segment made")
        values = live[step]
        batch, new = values["input_ids"].shape
        dims = next(value for value in graph.input if value.name == name).type.tensor_type.shape.dim
        shape = [d.dim_value for d in dims]
        shape[0], shape[2] = batch, values["attention_mask"].shape[1] - new  # [batch, heads, past, head size]
        return np.zeros(shape, np.float32)


# What segments computed, by what they depend on (Segmented._key): the verification runs the same model
# inputs many times (bare, verification flavour, each statistical run) and only the redistribution at the
# tail differs, so the model part is computed once. Bounded: the oldest go first.
_MEMO: dict[tuple, dict[str, np.ndarray]] = {}
MEMO_BYTES = 256 * 2**20


def _remember(key: tuple, outputs: dict[str, np.ndarray]) -> None:
    _MEMO.pop(key, None)
    _MEMO[key] = outputs
    while sum(a.nbytes for found in _MEMO.values() for a in found.values()) > MEMO_BYTES and len(_MEMO) > 1:
        del _MEMO[next(iter(_MEMO))]


def _op_types(graph: onnx.GraphProto):
    """The op types of `graph`'s nodes and of their subgraphs' (an If's branches)."""
    for node in graph.node:
        yield node.op_type
        for attribute in node.attribute:
            for inner in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
                yield from _op_types(inner)


def _trim() -> None:
    """Hands freed heap memory back to the system (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def weights_bytes(path: str | os.PathLike) -> tuple[int, bool]:
    """(bytes of the initializers of the graph at `path`, whether any is FP16), read without the weights."""
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    return sum(tensor_bytes(t) for t in tensors), any(t.data_type == onnx.TensorProto.FLOAT16 for t in tensors)


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation may take (MemAvailable), None where it does not say."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs_segments(path: str | os.PathLike) -> bool:
    """Whether the FP16 graph at `path` would not fit one ONNX Runtime session here: its session holds
    ~3x its FP16 weights (an FP32 copy of each, and the FP16 bytes; issue 23 measured 729 MB for 327 MB),
    against the memory available now."""
    size, half = weights_bytes(path)
    available = available_memory()
    return half and available is not None and 3 * size > 0.8 * available


class SegmentedEngine(Runner):
    """An ONNX Runtime runner of a graph run in segments of at most `budget_mb` MB of weights, one session
    open at a time (those without weights or with random draws stay open): for an FP16 graph whose
    session would not fit in memory. Slower per call (every large segment's session is made again)."""

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, budget_mb: float | None = None, threads=None, profile=None):
        self.path = Path(path)
        self.profile = profile
        self.graph = Segmented(self.path, budget_mb or SEGMENT_MB, threads)
        dtypes = {
            onnx.TensorProto.FLOAT: np.float32,
            onnx.TensorProto.FLOAT16: np.float16,
            onnx.TensorProto.INT64: np.int64,
        }
        self.inputs = {
            value.name: (
                dtypes.get(value.type.tensor_type.elem_type),
                [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim],
            )
            for value in self.graph.model.graph.input
            if value.name not in {tensor.name for tensor in self.graph.model.graph.initializer}
        }
        self.outputs = list(self.graph.outputs)

    def set_seed(self, seed: int):
        """Repeatable in-graph noise from here on: the kept sessions are made again after seeding."""
        import onnxruntime as ort

        ort.set_seed(int(seed))
        self.graph.close()

    def _infer(self, feed: dict) -> dict[str, np.ndarray]:
        return self.graph.run(feed)

    def infer_calls(self, feeds: list[dict]) -> list[dict[str, np.ndarray]]:
        """Calls whose every input but the cache is known beforehand, segment-major (Segmented.run_calls):
        one sweep of the segments' sessions for all of them, not one per call. The first feed is checked
        whole; the later ones lack the cache, which each takes from the call before."""
        return self.graph.run_calls([self.check_feed(feeds[0]), *feeds[1:]])

    def close(self):
        self.graph.close()
