"""AIM logits redistribution (SPEC sections 1, 4): the ONNX subgraph and its PyTorch twin.

    z' = z + utility * n1 + focus * |n2|        n1, n2 ~ N(0, 1) i.i.d. per element, fresh per call

`redistribute` states the computation once, over a small set of ops; `_GraphOps` emits it as ONNX nodes
and `_TorchOps` evaluates it in PyTorch. The two implementations are tested against each other
(tests/graph_passes/test_redistribution.py), so they cannot drift apart silently.

What the statement adds to the bare formula, and why:
- Sanitising (the graph is served to clients that bypass our Python checks, e.g. through Triton):
  NaN -> 0, utility -> min(|utility|, MAX_STRENGTH), focus clipped to [-MAX_STRENGTH, MAX_STRENGTH].
  So no request can turn the logits into NaN or inf.
- Skipping (benchmark P1a): when the whole batch asks for utility 0 and focus 0, an `If` returns the
  bare logits without drawing any noise; the bare logits' producer node is moved into both branches,
  so that branch writes straight into the output instead of copying it (FP32 logits only: see
  _movable_producer).
- Sparse focus (benchmark P2): focus noise is drawn only for the classes some sample focuses on
  (their indices -> Gather -> add -> ScatterElements back), not over the whole logits tensor.
- One draw (benchmark P2): the production flavour draws n1 and n2 from ONE random node (Box-Muller
  over one uniform draw by default, or one RandomNormalLike), so no second random node's seed can
  correlate with the first (see _DrawnNoise). A uniform costs ONNX Runtime ~40% of a normal, but
  Box-Muller's extra passes take most of that back: `make bench` measures the two within 10%.
- TensorRT: no NonZero (TensorRT for RTX lacks it), no TopK (K <= 3840), no nested If (TensorRT for
  RTX fails to build them; a second If beside the first made its builder crash on Llama).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from aim.contract import FLAVOURS, FOCUS, MAX_STRENGTH, MODULATION_INPUTS, NOISE_INPUTS, NOISE_METHODS, PREFIX, UTILITY
from aim.errors import InvalidGraphError
from aim.lazy import lazy_import

torch = lazy_import("torch")  # the PyTorch twin only: emitting the graph needs no torch

MAX_MOVED_CONSTANT = 64 * 1024  # bytes: see _movable_producer
# Box-Muller's first uniform is drawn from [TINY, 1) so that log() never sees 0; it bounds |n1| by
# sqrt(-2 ln TINY) = 13.2, a tail of probability 1e-38, far below what a float32 uniform resolves.
TINY = float(np.finfo(np.float32).tiny)


def redistribute(ops, bare, utility, focus, noise, rank: int, class_axis: int):
    """The one statement of the computation.

    `bare()` gives the bare logits (rank `rank`, batch on axis 0, classes on `class_axis`); it is called
    once per branch so that a graph can compute them inside the branch that returns them. `utility` [B]
    and `focus` [B, C] are the raw knobs; `noise.draw` supplies n1 (shaped like the logits) and n2
    (shaped like the logits of the focused classes only).
    """
    u = ops.minimum(ops.abs(ops.zero_nan(utility)), MAX_STRENGTH)
    f = ops.clip(ops.zero_nan(focus), -MAX_STRENGTH, MAX_STRENGTH)
    f_abs = ops.abs(f)
    active = ops.or_(ops.greater(ops.reduce_max(u), 0.0), ops.greater(ops.reduce_max(f_abs), 0.0))
    # [K]: the classes some row focuses on. Outside the If, and no If inside it: TensorRT for RTX
    # fails to build nested Ifs.
    classes = ops.focused(ops.reduce_max(f_abs, axis=0))
    other_axes = [axis for axis in range(1, rank) if axis != class_axis]

    def modulated():
        z = ops.to_float32(bare())  # the noise arithmetic is FP32 whatever the logits' type
        n1, n2 = noise.draw(ops, z, classes)
        # Rows with utility 0 get z + 0 * n1 = z exactly, so one batch can mix service tiers.
        z = ops.add(z, ops.mul(ops.unsqueeze(u, list(range(1, rank))), n1))
        picked = ops.gather(z, classes, class_axis)
        strength = ops.unsqueeze(ops.gather(f, classes, 1), other_axes)
        shifted = ops.add(picked, ops.mul(strength, ops.abs(n2)))
        return ops.to_logits_dtype(ops.scatter(z, classes, shifted, class_axis, rank))

    return ops.if_(active, modulated, bare)


class _TorchOps:
    """`redistribute` evaluated eagerly; `if_` is a plain Python branch."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    @staticmethod
    def unsqueeze(x, axes):
        for axis in sorted(axes):
            x = x.unsqueeze(axis)
        return x

    @staticmethod
    def zero_nan(x):
        return torch.where(torch.isnan(x), torch.zeros_like(x), x)

    @staticmethod
    def minimum(x, bound: float):
        return torch.clamp(x, max=bound)

    @staticmethod
    def clip(x, low: float, high: float):
        return torch.clamp(x, low, high)

    @staticmethod
    def reduce_max(x, axis: int | None = None):
        return x.max() if axis is None else x.amax(dim=axis)

    @staticmethod
    def greater(x, value: float):
        return x > value

    @staticmethod
    def if_(condition, then_branch, else_branch):
        return then_branch() if bool(condition) else else_branch()

    @staticmethod
    def focused(strength):
        return torch.nonzero(strength > 0).flatten()

    @staticmethod
    def gather(x, indices, axis: int):
        return torch.index_select(x, axis, indices)

    @staticmethod
    def scatter(x, indices, updates, axis: int, rank: int):
        return x.index_copy(axis, indices, updates)

    def to_float32(self, x):
        return x.float()

    def to_logits_dtype(self, x):
        return x.to(self.dtype)

    @staticmethod
    def mul(a, b):
        return torch.mul(a, b)

    @staticmethod
    def add(a, b):
        return torch.add(a, b)

    @staticmethod
    def abs(x):
        return torch.abs(x)

    @staticmethod
    def or_(a, b):
        return torch.logical_or(a, b)


class _GraphOps:
    """Appends ONNX nodes to the graph being built (the main graph or an If branch); every node and
    tensor is named under PREFIX, with one counter, so names are unique across all (sub)graphs."""

    def __init__(self, graph: gs.Graph, logits_dtype, num_classes: int):
        self.graph = graph
        self.classes = num_classes
        self.opset = graph.opset
        self.logits_dtype = np.dtype(logits_dtype)
        self.count = 0

    def unique(self, base: str) -> str:
        """`base` with this builder's next number: unique across the graph and its branches."""
        self.count += 1
        return f"{base}_{self.count}"

    def name(self, what: str) -> str:
        return self.unique(f"{PREFIX}/{what}")

    def node(self, op: str, inputs: list, attrs: dict | None = None, dtype=np.float32) -> gs.Variable:
        name = self.name(op)
        out = gs.Variable(f"{name}/output", dtype=dtype)
        self.graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def constant(self, value, dtype=np.float32) -> gs.Constant:
        return gs.Constant(self.name("constant"), np.array(value, dtype=dtype))

    def unsqueeze(self, x, axes):
        if not axes:
            return x
        return self.node("Unsqueeze", [x, self.constant(axes, np.int64)], dtype=x.dtype)

    def zero_nan(self, x):
        return self.node("Where", [self.node("IsNaN", [x], dtype=bool), self.constant(0.0), x])

    def minimum(self, x, bound: float):
        return self.node("Min", [x, self.constant(bound)])

    def clip(self, x, low: float, high: float):
        return self.node("Clip", [x, self.constant(low), self.constant(high)])

    def reduce_max(self, x, axis: int | None = None):
        if axis is None:  # no axes: every axis, in every opset
            return self.node("ReduceMax", [x], {"keepdims": 0})
        if self.opset >= 18:  # axes moved from an attribute to an input in opset 18
            return self.node("ReduceMax", [x, self.constant([axis], np.int64)], {"keepdims": 0})
        return self.node("ReduceMax", [x], {"keepdims": 0, "axes": [axis]})

    def greater(self, x, value: float):
        return self.node("Greater", [x, self.constant(value)], dtype=bool)

    def or_(self, a, b):
        return self.node("Or", [a, b], dtype=bool)

    def mul(self, a, b):
        return self.node("Mul", [a, b])

    def add(self, a, b):
        return self.node("Add", [a, b])

    def abs(self, x):
        return self.node("Abs", [x])

    def focused(self, strength):
        """Indices of the entries of `strength` [C] that are > 0, in order, without NonZero (TensorRT
        for RTX lacks it) or TopK (K <= 3840 in TensorRT): each focused class's rank among the focused
        (CumSum - 1) is its slot; the others all write to one spare slot, which is dropped."""
        i64 = np.int64
        chosen = self.greater(strength, 0.0)
        mask = self.node("Cast", [chosen], {"to": onnx.TensorProto.INT64}, dtype=i64)
        count = self.node("ReduceSum", [mask, self.constant([0], i64)], {"keepdims": 1}, dtype=i64)  # [1]
        # CumSum in FP32 (TensorRT's CumSum takes floating point), exact for counts below 2**24.
        ones = self.node("Cast", [chosen], {"to": onnx.TensorProto.FLOAT})
        running = self.node("CumSum", [ones, self.constant(0, np.int32)])
        rank = self.node("Sub", [self.node("Cast", [running], {"to": onnx.TensorProto.INT64}, dtype=i64), self.constant(1, i64)], dtype=i64)
        slot = self.node("Where", [chosen, rank, count], dtype=i64)
        slots = self.node("ConstantOfShape", [self.node("Add", [count, self.constant([1], i64)], dtype=i64)],
                          {"value": onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [1], [0])}, dtype=i64)
        every = self.node("Range", [self.constant(0, i64), self.constant(self.classes, i64), self.constant(1, i64)], dtype=i64)
        placed = self.node("ScatterElements", [slots, slot, every], {"axis": 0}, dtype=i64)
        return self.node("Slice", [placed, self.constant([0], i64), count, self.constant([0], i64)], dtype=i64)

    def gather(self, x, indices, axis: int):
        return self.node("Gather", [x, indices], {"axis": axis}, dtype=x.dtype)

    def scatter(self, x, indices, updates, axis: int, rank: int):
        # ScatterElements wants indices shaped like the updates: [K] placed on `axis`, expanded.
        shape = [-1 if a == axis else 1 for a in range(rank)]
        placed = self.node("Reshape", [indices, self.constant(shape, np.int64)], dtype=np.int64)
        full = self.node("Expand", [placed, self.node("Shape", [updates], dtype=np.int64)], dtype=np.int64)
        return self.node("ScatterElements", [x, full, updates], {"axis": axis}, dtype=x.dtype)

    def if_(self, condition, then_branch, else_branch):
        branches = {}
        for label, build in (("then_branch", then_branch), ("else_branch", else_branch)):
            outer, self.graph = self.graph, gs.Graph(name=self.name(label), opset=self.opset)
            try:
                out = build()
                if not any(out in node.outputs for node in self.graph.nodes):
                    out = self.node("Identity", [out], dtype=out.dtype)  # a branch returns its own tensor
                self.graph.outputs = [out]
                branches[label] = self.graph
            finally:
                self.graph = outer
        then_out, else_out = branches["then_branch"].outputs[0], branches["else_branch"].outputs[0]
        out = self.node("If", [condition], branches, dtype=then_out.dtype)
        out.shape = then_out.shape if then_out.shape == else_out.shape else None
        return out

    def to_float32(self, x):
        return x if x.dtype == np.float32 else self.cast(x, np.float32)

    def to_logits_dtype(self, x):
        return x if self.logits_dtype == np.float32 else self.cast(x, self.logits_dtype)

    def cast(self, x, dtype):
        out = self.node("Cast", [x], {"to": onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))}, dtype=dtype)
        out.shape = x.shape
        return out


class _GivenNoise:
    """The verification flavour: n1 and n2 are graph inputs shaped like the logits; focus takes n2 at
    the focused classes only."""

    def __init__(self, noise_utility, noise_focus, class_axis: int):
        self.noise_utility, self.noise_focus, self.class_axis = noise_utility, noise_focus, class_axis

    def draw(self, ops, z, classes):
        return self.noise_utility, ops.gather(self.noise_focus, classes, self.class_axis)


class _DrawnNoise:
    """The production flavour: ONE random draw per run covers both noises.

    One random node, not one per noise: ONNX Runtime seeds every random kernel from the clock (or all
    with the same `set_seed` value), so two kernels give identical or shifted LCG streams and their
    noises would be correlated. The draw covers M = C + K entries along the class axis (K: focused
    classes); n1 is the first C, n2 the next K.

    method "box-muller": one RandomUniformLike; uniforms a, b over M/2 entries each give the cosine
    and the sine halves r cos(2 pi b), r sin(2 pi b), r = sqrt(-2 ln a): independent exact N(0, 1),
    one uniform per normal. method "normal": one RandomNormalLike. `make bench` measures both.
    """

    def __init__(self, class_axis: int, num_classes: int, method: str = "box-muller"):
        if method not in NOISE_METHODS:
            raise ValueError(f"noise method must be one of {NOISE_METHODS}, got {method!r}")
        self.axis, self.classes, self.method = class_axis, num_classes, method

    def draw(self, ops, z, classes):
        axis, i64 = self.axis, np.int64
        n1_size = ops.constant([self.classes], i64)
        total = ops.node("Add", [n1_size, ops.node("Shape", [classes], dtype=i64)], dtype=i64)  # C + K
        axes = ops.constant([axis], i64)

        def like(size):  # a tensor shaped like z but with `size` entries on the class axis
            shape = ops.node(
                "Concat",
                [ops.node("Shape", [z], {"end": axis}, dtype=i64), size, ops.node("Shape", [z], {"start": axis + 1}, dtype=i64)],
                {"axis": 0},
                dtype=i64,
            )
            return ops.node("ConstantOfShape", [shape], {"value": onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.0])})

        # No seed: TensorRT ignores seeds, and every run must draw afresh.
        if self.method == "normal":
            normal = ops.node("RandomNormalLike", [like(total)], {"dtype": onnx.TensorProto.FLOAT, "mean": 0.0, "scale": 1.0})
        else:
            half = ops.node("Div", [ops.node("Add", [total, ops.constant([1], i64)], dtype=i64), ops.constant([2], i64)], dtype=i64)
            whole = ops.node("Mul", [half, ops.constant([2], i64)], dtype=i64)
            # [TINY, 1): log() never sees 0.
            uniform = ops.node("RandomUniformLike", [like(whole)], {"dtype": onnx.TensorProto.FLOAT, "low": TINY, "high": 1.0})
            a = ops.node("Slice", [uniform, ops.constant([0], i64), half, axes])
            b = ops.node("Slice", [uniform, half, whole, axes])
            radius = ops.node("Sqrt", [ops.mul(ops.node("Log", [a]), ops.constant(-2.0))])
            angle = ops.mul(b, ops.constant(2.0 * math.pi))
            normal = ops.node("Concat", [ops.mul(radius, ops.node(op, [angle])) for op in ("Cos", "Sin")], {"axis": axis})
        n1 = ops.node("Slice", [normal, ops.constant([0], i64), n1_size, axes])
        n2 = ops.node("Slice", [normal, n1_size, total, axes])
        return n1, n2


class _TorchNoise(_GivenNoise):
    """Noise for the PyTorch twin: given whole tensors, as the verification flavour takes them, or
    where not given, drawn from `generator` (n2 only for the focused classes, as the graph draws it)."""

    def __init__(self, noise_utility, noise_focus, class_axis: int, generator):
        super().__init__(noise_utility, noise_focus, class_axis)
        self.generator = generator

    def draw(self, ops, z, classes):
        if self.noise_utility is None:
            self.noise_utility = torch.randn(z.shape, generator=self.generator)
        if self.noise_focus is None:
            shape = list(z.shape)
            shape[self.class_axis] = len(classes)
            return self.noise_utility, torch.randn(shape, generator=self.generator)
        return super().draw(ops, z, classes)


def _logits_output(graph: gs.Graph, logits: str) -> gs.Variable:
    outputs = {tensor.name: tensor for tensor in graph.outputs}
    if logits not in outputs:
        raise InvalidGraphError(
            f"the graph has no output named {logits!r}; its outputs are {sorted(outputs)}. "
            f"Pass the name of the logits output (--logits NAME)."
        )
    z = outputs[logits]
    if z in graph.inputs:
        raise InvalidGraphError(
            f"output {logits!r} is also a graph input (passed straight through): modulating it would rename the input "
            f"that clients send. Pass the name of the output the model computes its logits into (--logits NAME)."
        )
    if z.dtype is not None and (np.issubdtype(np.dtype(z.dtype), np.integer) or np.dtype(z.dtype) == np.bool_):
        raise InvalidGraphError(
            f"output {logits!r} is {np.dtype(z.dtype).name}: it holds class ids or flags, not logits, and noise added to "
            f"them would change the ids. Pass the floating-point output the model computes its scores into (--logits NAME)."
        )
    return z


def _class_axis(z: gs.Variable, class_axis: int) -> tuple[int, int]:
    """Normalised class axis and the number of classes; the batch is axis 0."""
    if z.shape is None:
        raise InvalidGraphError(
            f"the rank of {z.name!r} is unknown; run ONNX shape inference or export with output shapes"
        )
    rank = len(z.shape)
    axis = class_axis + rank if class_axis < 0 else class_axis
    if rank < 2 or not 1 <= axis < rank:
        raise InvalidGraphError(
            f"class axis {class_axis} is out of range for logits {z.name!r} of shape {list(z.shape)}: "
            f"axis 0 is the batch, so the class axis must be one of 1..{rank - 1} (or -1..{1 - rank})."
        )
    classes = z.shape[axis]
    if not isinstance(classes, int) or classes <= 0:
        raise InvalidGraphError(
            f"the class axis {class_axis} of {z.name!r} (shape {list(z.shape)}) has no static size; "
            f"focus needs a known number of classes. Export with a fixed number of classes."
        )
    return axis, classes


def _nbytes(constant: gs.Constant) -> int:
    return int(np.prod(constant.shape, dtype=np.int64)) * np.dtype(constant.dtype).itemsize


def _movable_producer(graph: gs.Graph, z: gs.Variable) -> gs.Node | None:
    """The node computing the logits, if nothing else needs it: then it can be computed inside the
    If's branches, and the skip branch writes the bare logits straight into the output (no copy)."""
    if len(z.inputs) != 1 or z.outputs or z in graph.inputs:
        return None
    # Reduced-precision logits stay where they are: ONNX Runtime's CPU provider runs FP16 chains it has
    # no FP16 kernels for in FP32 and rounds to FP16 only where a tensor leaves the chain (a graph output,
    # an If's input). Moved into a branch, the producer would read inputs rounded at the branch's edge,
    # which the bare graph never rounds: a third of the "exact" logits differed, mostly by one FP16 ulp.
    if np.dtype(z.dtype) != np.float32:
        return None
    producer = z.inputs[0]
    if len(producer.outputs) != 1 or producer.op in ("If", "Loop", "Scan"):
        return None
    # Weights used inside both branches would be stored twice (a classifier head: megabytes), while
    # the copy saved is only that of the small logits such heads make.
    # Sized from shape and type: a weight kept in an external data file is never read (aim/weights.py).
    if any(isinstance(t, gs.Constant) and _nbytes(t) > MAX_MOVED_CONSTANT for t in producer.inputs):
        return None
    return producer


def add_redistribution(
    graph: gs.Graph, logits: str = "logits", class_axis: int = 1, flavour: str = "production", noise: str = "box-muller"
) -> gs.Graph:
    """Splices the redistribution onto the output `logits`, which keeps its name, shape and dtype.

    Adds graph inputs `utility` [B] and `focus` [B, C] (FP32). The production flavour draws the noise
    in the graph; the verification flavour takes it as inputs `noise_utility` and `noise_focus` shaped
    like the logits, so every backend can be compared element-wise. Both share every other node.
    `noise`: how the production flavour makes N(0, 1), one of NOISE_METHODS (see _DrawnNoise).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    z = _logits_output(graph, logits)
    taken = [name for name in (*MODULATION_INPUTS, *NOISE_INPUTS) if name in graph.tensors()]
    if taken:
        raise InvalidGraphError(
            f"the graph already has tensors named {taken}: is it modulated already? Start from the bare model."
        )
    axis, classes = _class_axis(z, class_axis)
    rank, shape, dtype = len(z.shape), list(z.shape), z.dtype
    batch = shape[0]

    ops = _GraphOps(graph, dtype, classes)
    producer = _movable_producer(graph, z)
    if producer is not None:
        graph.nodes.remove(producer)

    def bare():
        if producer is None:
            return z
        # The model's own node, moved into the branch: it keeps a model name (not PREFIX), so that passes
        # by name (fp16 keeps PREFIX nodes in FP32) treat it as the model, as in the bare graph.
        name = ops.unique(f"{producer.name or producer.op}/bare")
        out = gs.Variable(f"{name}/output", dtype=dtype, shape=shape)
        attrs = dict(producer.attrs)
        ops.graph.nodes.append(gs.Node(producer.op, name=name, attrs=attrs, inputs=list(producer.inputs), outputs=[out], domain=producer.domain))
        return out

    # The bare logits get a new name; the modulated output takes over the name that clients know.
    z.name = f"{PREFIX}/{logits}_bare"
    utility = gs.Variable(UTILITY, dtype=np.float32, shape=[batch])
    focus = gs.Variable(FOCUS, dtype=np.float32, shape=[batch, classes])
    graph.inputs.extend([utility, focus])
    if flavour == "verification":
        given = [gs.Variable(name, dtype=np.float32, shape=shape) for name in NOISE_INPUTS]
        graph.inputs.extend(given)
        source = _GivenNoise(*given, class_axis=axis)
    else:
        source = _DrawnNoise(axis, classes, noise)
    out = redistribute(ops, bare, utility, focus, source, rank=rank, class_axis=axis)
    out.name, out.dtype, out.shape = logits, dtype, shape
    graph.outputs = [out if tensor is z else tensor for tensor in graph.outputs]
    return graph.cleanup().toposort()


def redistribute_torch(
    logits: torch.Tensor,
    utility: torch.Tensor,
    focus: torch.Tensor,
    noise_utility: torch.Tensor | None = None,
    noise_focus: torch.Tensor | None = None,
    class_axis: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The PyTorch reference of `add_redistribution`: the same statement, the same FP32 arithmetic.
    Noise not given is drawn from `generator`, as the production flavour draws it in the graph."""
    rank = logits.dim()
    axis = class_axis % rank
    noise = _TorchNoise(noise_utility, noise_focus, axis, generator)
    return redistribute(_TorchOps(logits.dtype), lambda: logits, utility.float(), focus.float(), noise, rank, axis)
