"""AIM logits redistribution (docs/method.md §1, §4): the ONNX subgraph and its PyTorch twin.

    z' = z + utility * n1 + focus * |n2|        n1, n2 ~ N(0, 1) i.i.d. per element, fresh per call
                                                (or keyed: a function of a secret key and the request)

`redistribute` states the computation once, over a small set of ops; `_GraphOps` emits it as ONNX nodes
and `_TorchOps` evaluates it in PyTorch. The two implementations are tested against each other
(tests/graph_passes/test_redistribution.py, test_keyed.py), so they cannot drift apart silently.

What the statement adds to the bare formula, and why:
- Sanitising (the graph is served to clients that bypass our Python checks, e.g. through Triton):
  utility -> min(|utility|, MAX_STRENGTH) with NaN as MAX_STRENGTH (fail closed: the weakest tier,
  never the bare model), focus clipped to [-MAX_STRENGTH, MAX_STRENGTH] with NaN as 0. So no request
  can turn the logits into NaN or inf, nor buy the premium answer with a NaN.
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
from aim.graph_passes.noise_key import ABSORB_ROUNDS, PRIME, PROJECTIONS, KeyedConstants, NoiseKey
from aim.lazy import lazy_import

torch = lazy_import("torch")  # the PyTorch twin only: emitting the graph needs no torch

MAX_MOVED_CONSTANT = 64 * 1024  # bytes: see _movable_producer
# Box-Muller's first uniform is drawn from [TINY, 1) so that log() never sees 0; it bounds |n1| by
# sqrt(-2 ln TINY) = 13.2, a tail of probability 1e-38, far below what a float32 uniform resolves.
TINY = float(np.finfo(np.float32).tiny)
# Keyed noise (_KeyedNoise): the digest's quantization step in units of the row's sigma (RMS logit
# units); the step of rows at utility 0, whose focus noise is keyed too, in logit units; and the
# resolution at which sigma itself is absorbed (tiers 2**-16 apart draw apart). The step trades the
# draws a perturbation buys against how many requests share one: on the digits classifier at the
# sigma of 50% agreement (README, keyed noise), sigma/4 keeps the tier's agreement as steady across
# keys as independent draws would (135 distinct draws among 360 test images) while 1/255 pixel
# perturbations buy a fresh draw 7% of the time; a step of sigma leaves 21 draws, and one key's tier
# anywhere between 30% and 70%.
DIGEST_STEP = 0.25
FOCUS_ONLY_STEP = 1.0
TIER_RESOLUTION = 2.0**16


def redistribute(ops, bare, utility, focus, noise, rank: int, class_axis: int):
    """The one statement of the computation.

    `bare()` gives the bare logits (rank `rank`, batch on axis 0, classes on `class_axis`); it is called
    once per branch so that a graph can compute them inside the branch that returns them. `utility` [B]
    and `focus` [B, C] are the raw knobs; `noise.draw` supplies n1 (shaped like the logits) and n2
    (shaped like the logits of the focused classes only); keyed noise reads the sanitised utility too.
    """
    # Fail closed: a NaN utility is the weakest tier (MAX_STRENGTH), never the bare model; a NaN focus is no focus.
    u = ops.minimum(ops.abs(ops.nan_to(utility, MAX_STRENGTH)), MAX_STRENGTH)
    f = ops.clip(ops.nan_to(focus, 0.0), -MAX_STRENGTH, MAX_STRENGTH)
    f_abs = ops.abs(f)
    active = ops.or_(ops.greater(ops.reduce_max(u), 0.0), ops.greater(ops.reduce_max(f_abs), 0.0))
    # [K]: the classes some row focuses on. Outside the If, and no If inside it: TensorRT for RTX
    # fails to build nested Ifs.
    classes = ops.focused(ops.reduce_max(f_abs, axis=0))
    other_axes = [axis for axis in range(1, rank) if axis != class_axis]

    def modulated():
        z = ops.to_float32(bare())  # the noise arithmetic is FP32 whatever the logits' type
        n1, n2 = noise.draw(ops, z, classes, u)
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
    def nan_to(x, value: float):
        return torch.where(torch.isnan(x), torch.full_like(x, value), x)

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

    # -- keyed noise (_KeyedNoise)

    @staticmethod
    def constant(value, dtype=np.float32):
        return torch.from_numpy(np.array(value, dtype=dtype))

    @staticmethod
    def sub(a, b):
        return torch.sub(a, b)

    @staticmethod
    def div(a, b):
        return torch.div(a, b)

    @staticmethod
    def mod(a, b):
        return torch.remainder(a, b)

    @staticmethod
    def matmul(a, b):
        return torch.matmul(a, b)

    @staticmethod
    def where(condition, a, b):
        return torch.where(condition, a, b)

    @staticmethod
    def floor(x):
        return torch.floor(x)

    @staticmethod
    def to_int64(x):
        return x.to(torch.int64)

    @staticmethod
    def reduce_mean(x, axes: list[int], keepdims: bool = False):
        return x.mean(dim=axes, keepdim=keepdims)

    @staticmethod
    def concat(tensors, axis: int):
        return torch.cat(tensors, dim=axis)

    @staticmethod
    def slice(x, start: int, end: int, axis: int):
        return x.narrow(axis, start, end - start)

    @staticmethod
    def on_axis(x, axis: int, rank: int):
        return x.reshape([x.numel() if a == axis else 1 for a in range(rank)])

    @staticmethod
    def arange(z, axis: int, extra: int = 0):
        return torch.arange(z.shape[axis] + extra, dtype=torch.int64)

    @staticmethod
    def positions(z, class_axis: int, rank: int):
        shape = [1 if a in (0, class_axis) else z.shape[a] for a in range(rank)]
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)

    @staticmethod
    def log(x):
        return torch.log(x)

    @staticmethod
    def sqrt(x):
        return torch.sqrt(x)

    @staticmethod
    def cos(x):
        return torch.cos(x)

    @staticmethod
    def sin(x):
        return torch.sin(x)


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

    def nan_to(self, x, value: float):
        return self.node("Where", [self.node("IsNaN", [x], dtype=bool), self.constant(value), x])

    def minimum(self, x, bound: float):
        return self.node("Min", [x, self.constant(bound)])

    def clip(self, x, low: float, high: float):
        return self.node("Clip", [x, self.constant(low), self.constant(high)])

    def reduce_max(self, x, axis: int | None = None):
        return self.reduce("ReduceMax", x, None if axis is None else [axis])

    def reduce(self, op: str, x, axes: list[int] | None, keepdims: bool = False):
        if axes is None:  # no axes: every axis, in every opset
            return self.node(op, [x], {"keepdims": int(keepdims)}, dtype=x.dtype)
        if self.opset >= 18:  # axes moved from an attribute to an input in opset 18
            return self.node(op, [x, self.constant(axes, np.int64)], {"keepdims": int(keepdims)}, dtype=x.dtype)
        return self.node(op, [x], {"keepdims": int(keepdims), "axes": axes}, dtype=x.dtype)

    def greater(self, x, value: float):
        return self.node("Greater", [x, self.constant(value)], dtype=bool)

    def or_(self, a, b):
        return self.node("Or", [a, b], dtype=bool)

    def mul(self, a, b):
        return self.node("Mul", [a, b], dtype=a.dtype)

    def add(self, a, b):
        return self.node("Add", [a, b], dtype=a.dtype)

    def abs(self, x):
        return self.node("Abs", [x])

    # -- keyed noise (_KeyedNoise)

    def sub(self, a, b):
        return self.node("Sub", [a, b], dtype=a.dtype)

    def div(self, a, b):
        return self.node("Div", [a, b], dtype=a.dtype)

    def mod(self, a, b):
        return self.node("Mod", [a, b], dtype=a.dtype)  # integers: fmod=0, Python's sign (all >= 0 here)

    def matmul(self, a, b):
        return self.node("MatMul", [a, b])

    def where(self, condition, a, b):
        return self.node("Where", [condition, a, b], dtype=a.dtype)

    def floor(self, x):
        return self.node("Floor", [x])

    def to_int64(self, x):
        return self.cast(x, np.int64)

    def reduce_mean(self, x, axes: list[int], keepdims: bool = False):
        return self.reduce("ReduceMean", x, axes, keepdims)

    def concat(self, tensors, axis: int):
        return self.node("Concat", list(tensors), {"axis": axis}, dtype=tensors[0].dtype)

    def slice(self, x, start: int, end: int, axis: int):
        i64 = np.int64
        return self.node(
            "Slice",
            [x, self.constant([start], i64), self.constant([end], i64), self.constant([axis], i64)],
            dtype=x.dtype,
        )

    def on_axis(self, x, axis: int, rank: int):
        """A vector [J] laid along `axis` of a rank-`rank` tensor: [1, .., J, .., 1]."""
        return self.node(
            "Reshape", [x, self.constant([-1 if a == axis else 1 for a in range(rank)], np.int64)], dtype=x.dtype
        )

    def arange(self, z, axis: int, extra: int = 0):
        """0, 1, .., z.shape[axis] + extra - 1 (int64) from z's shape at run time: a range of constant
        size would be folded into the engine file, 8 bytes per class."""
        i64 = np.int64
        size = self.node("Shape", [z], {"start": axis, "end": axis + 1}, dtype=i64)
        limit = self.node("Squeeze", [self.add(size, self.constant([extra], i64)), self.constant([0], i64)], dtype=i64)
        return self.node("Range", [self.constant(0, i64), limit, self.constant(1, i64)], dtype=i64)

    def positions(self, z, class_axis: int, rank: int):
        """Each element's row-major index among the axes other than the batch and the classes: int64
        shaped like `z` with those two axes 1 (dynamic sizes: Shape, ReduceProd, Range, Reshape)."""
        i64 = np.int64
        kept = [0 if a in (0, class_axis) else 1 for a in range(rank)]
        shape = self.node("Shape", [z], dtype=i64)
        dims = self.add(self.mul(shape, self.constant(kept, i64)), self.constant([1 - k for k in kept], i64))
        count = self.reduce("ReduceProd", dims, [0])
        flat = self.node("Range", [self.constant(0, i64), count, self.constant(1, i64)], dtype=i64)
        return self.node("Reshape", [flat, dims], dtype=i64)

    def log(self, x):
        return self.node("Log", [x])

    def sqrt(self, x):
        return self.node("Sqrt", [x])

    def cos(self, x):
        return self.node("Cos", [x])

    def sin(self, x):
        return self.node("Sin", [x])

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
        rank = self.node(
            "Sub",
            [self.node("Cast", [running], {"to": onnx.TensorProto.INT64}, dtype=i64), self.constant(1, i64)],
            dtype=i64,
        )
        slot = self.node("Where", [chosen, rank, count], dtype=i64)
        slots = self.node(
            "ConstantOfShape",
            [self.node("Add", [count, self.constant([1], i64)], dtype=i64)],
            {"value": onnx.helper.make_tensor("value", onnx.TensorProto.INT64, [1], [0])},
            dtype=i64,
        )
        every = self.node(
            "Range", [self.constant(0, i64), self.constant(self.classes, i64), self.constant(1, i64)], dtype=i64
        )
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

    def draw(self, ops, z, classes, utility):
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

    def draw(self, ops, z, classes, utility):
        axis, i64 = self.axis, np.int64
        n1_size = ops.constant([self.classes], i64)
        total = ops.node("Add", [n1_size, ops.node("Shape", [classes], dtype=i64)], dtype=i64)  # C + K
        axes = ops.constant([axis], i64)

        def like(size):  # a tensor shaped like z but with `size` entries on the class axis
            shape = ops.node(
                "Concat",
                [
                    ops.node("Shape", [z], {"end": axis}, dtype=i64),
                    size,
                    ops.node("Shape", [z], {"start": axis + 1}, dtype=i64),
                ],
                {"axis": 0},
                dtype=i64,
            )
            return ops.node(
                "ConstantOfShape",
                [shape],
                {"value": onnx.helper.make_tensor("value", onnx.TensorProto.FLOAT, [1], [0.0])},
            )

        # No seed: TensorRT ignores seeds, and every run must draw afresh.
        if self.method == "normal":
            normal = ops.node(
                "RandomNormalLike", [like(total)], {"dtype": onnx.TensorProto.FLOAT, "mean": 0.0, "scale": 1.0}
            )
        else:
            half = ops.node(
                "Div", [ops.node("Add", [total, ops.constant([1], i64)], dtype=i64), ops.constant([2], i64)], dtype=i64
            )
            whole = ops.node("Mul", [half, ops.constant([2], i64)], dtype=i64)
            # [TINY, 1): log() never sees 0.
            uniform = ops.node(
                "RandomUniformLike", [like(whole)], {"dtype": onnx.TensorProto.FLOAT, "low": TINY, "high": 1.0}
            )
            a = ops.node("Slice", [uniform, ops.constant([0], i64), half, axes])
            b = ops.node("Slice", [uniform, half, whole, axes])
            radius = ops.node("Sqrt", [ops.mul(ops.node("Log", [a]), ops.constant(-2.0))])
            angle = ops.mul(b, ops.constant(2.0 * math.pi))
            normal = ops.node(
                "Concat", [ops.mul(radius, ops.node(op, [angle])) for op in ("Cos", "Sin")], {"axis": axis}
            )
        n1 = ops.node("Slice", [normal, ops.constant([0], i64), n1_size, axes])
        n2 = ops.node("Slice", [normal, n1_size, total, axes])
        return n1, n2


class _KeyedNoise:
    """Keyed noise: n1 and n2 are a function of a secret key and of the request, so the same request
    gets the same draw whatever shares its batch (the same answer bit for bit in the same batch: the
    float math after the integer draw may move a last bit with a row's place in memory), and
    averaging repeats gains nothing.

    The request's digest, per row: its logits pooled over the non-class axes and centred over the
    classes, projected on PROJECTIONS keyed +-1 directions, divided by a step of DIGEST_STEP sigma
    (in RMS logit units), shifted by a keyed phase and floored; these cells and the tier,
    floor(sigma * TIER_RESOLUTION), are absorbed into the row's seed. So an input perturbed slightly
    keeps its cells (a fresh draw needs its pooled logits moved by about a step), a row's logits
    changing in their last bits with the batch move them by ~1e-6 of a step, and nothing else of the
    batch enters a row's noise: neither its place in the batch nor the classes others focus on.
    Requests whose pooled logits lie within a cell share their noise: at that tier they are one
    question, and the difference of their answers shows only the difference of their logits.

    The generator is counter-based on integer Mul, Add and Mod only (TensorRT has no bitwise
    operators), in int64 modulo PRIME, where cubing is a permutation: an element's uniform is
    cube(class_hash + position_hash) of CLASS_ROUNDS cubings each of keyed counters with the seed,
    so the full-size tensor costs one cubing. n1 by Box-Muller over the class axis (cosine and sine
    halves: one uniform per normal); n2 (the focused classes only) from two uniforms of its own
    counters per normal, so that a class's focus noise does not depend on which classes are focused.
    """

    def __init__(self, constants: KeyedConstants, class_axis: int, num_classes: int, rank: int):
        if constants.projection.shape[0] != num_classes:
            raise ValueError(
                f"keyed constants for {constants.projection.shape[0]} classes, the logits have {num_classes}"
            )
        self.k, self.axis, self.classes, self.rank = constants, class_axis, num_classes, rank

    @staticmethod
    def _cube(ops, x):
        """x**3 mod PRIME for 0 <= x < 2 PRIME: every product stays below 2**63."""
        prime = ops.constant(PRIME, np.int64)
        return ops.mod(ops.mul(ops.mod(ops.mul(x, x), prime), x), prime)

    def _hash(self, ops, seed, counters, rounds):
        x = self._cube(ops, ops.add(seed, counters))
        for key in rounds:
            x = self._cube(ops, ops.add(x, ops.constant(key, np.int64)))
        return x

    def _seed(self, ops, z, utility):
        """[B, 1] int64: the row's digest absorbed with the key."""
        k, i64 = self.k, np.int64
        other = [a for a in range(1, self.rank) if a != self.axis]
        pooled = ops.reduce_mean(z, other) if other else z  # [B, C]
        centred = ops.sub(pooled, ops.reduce_mean(pooled, [1], keepdims=True))
        projected = ops.matmul(centred, ops.to_float32(ops.constant(k.projection, np.float16)))  # [B, PROJECTIONS]
        sigma = ops.where(ops.greater(utility, 0.0), utility, ops.constant(FOCUS_ONLY_STEP))
        step = ops.mul(sigma, ops.constant(DIGEST_STEP * math.sqrt(self.classes)))  # +-1 projections: RMS * sqrt(C)
        cells = ops.floor(
            ops.clip(
                ops.nan_to(ops.add(ops.div(projected, ops.unsqueeze(step, [1])), ops.constant(k.offsets)), 0.0),
                -(2.0**28),
                2.0**28,
            )
        )
        tier = ops.to_int64(
            ops.floor(ops.mul(utility, ops.constant(TIER_RESOLUTION)))
        )  # utility <= MAX_STRENGTH: < PRIME
        words = ops.concat([ops.add(ops.to_int64(cells), ops.constant(2**28, i64)), ops.unsqueeze(tier, [1])], axis=1)
        seed = ops.constant([[k.absorb[0]]], i64)
        for i in range(PROJECTIONS + 1):
            seed = self._cube(ops, ops.add(seed, ops.slice(words, i, i + 1, axis=1)))
            for _ in range(ABSORB_ROUNDS - 1):
                seed = self._cube(ops, ops.add(seed, ops.constant(k.absorb[i + 1], i64)))
        return seed

    def draw(self, ops, z, classes, utility):
        k, axis, rank, i64 = self.k, self.axis, self.rank, np.int64
        seed = ops.unsqueeze(self._seed(ops, z, utility), list(range(2, rank)))  # [B, 1, ..., 1]
        place = ops.mod(
            ops.add(
                ops.mul(ops.positions(z, axis, rank), ops.constant(k.position_multiplier, i64)),
                ops.constant(k.position_offset, i64),
            ),
            ops.constant(PRIME, i64),
        )
        position_hash = self._hash(ops, seed, place, k.position_rounds)  # like z, class axis 1

        def uniform(counters):
            """(0, 1] shaped like z with `counters` [J] on the class axis: 30 bits, exact in FP32 arithmetic."""
            class_hash = self._hash(ops, seed, ops.on_axis(counters, axis, rank), k.class_rounds)
            x = self._cube(ops, ops.add(class_hash, position_hash))
            return ops.mul(ops.add(ops.to_float32(x), ops.constant(1.0)), ops.constant(2.0**-30))

        def radius(a):
            return ops.sqrt(ops.mul(ops.log(a), ops.constant(-2.0)))

        def angle(b):
            return ops.mul(b, ops.constant(2.0 * math.pi))

        def counters(slots):  # class slot j -> (j * multiplier + offset) mod PRIME
            scaled = ops.add(ops.mul(slots, ops.constant(k.class_multiplier, i64)), ops.constant(k.class_offset, i64))
            return ops.mod(scaled, ops.constant(PRIME, i64))

        even = self.classes + self.classes % 2
        pairs = uniform(counters(ops.arange(z, axis, self.classes % 2)))
        r, theta = radius(ops.slice(pairs, 0, even // 2, axis)), angle(ops.slice(pairs, even // 2, even, axis))
        n1 = ops.slice(
            ops.concat([ops.mul(r, ops.cos(theta)), ops.mul(r, ops.sin(theta))], axis), 0, self.classes, axis
        )

        def focused(start):  # n2's slots follow n1's: computed for the K focused classes only
            return uniform(counters(ops.add(classes, ops.constant(start, i64))))

        n2 = ops.mul(radius(focused(even)), ops.cos(angle(focused(even + self.classes))))
        return n1, n2


class _TorchNoise(_GivenNoise):
    """Noise for the PyTorch twin: given whole tensors, as the verification flavour takes them, or
    where not given, drawn from `generator` (n2 only for the focused classes, as the graph draws it)."""

    def __init__(self, noise_utility, noise_focus, class_axis: int, generator):
        super().__init__(noise_utility, noise_focus, class_axis)
        self.generator = generator

    def draw(self, ops, z, classes, utility):
        if self.noise_utility is None:
            self.noise_utility = torch.randn(z.shape, generator=self.generator)
        if self.noise_focus is None:
            shape = list(z.shape)
            shape[self.class_axis] = len(classes)
            return self.noise_utility, torch.randn(shape, generator=self.generator)
        return super().draw(ops, z, classes, utility)


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
            f"output {logits!r} is {np.dtype(z.dtype).name}: it holds class ids or flags, not logits, and "
            "noise added to "
            "them would change the ids. Pass the floating-point output the model computes its scores into "
            "(--logits NAME)."
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
    graph: gs.Graph,
    logits: str = "logits",
    class_axis: int = 1,
    flavour: str = "production",
    noise: str = "box-muller",
    key: NoiseKey | None = None,
) -> gs.Graph:
    """Splices the redistribution onto the output `logits`, which keeps its name, shape and dtype.

    Adds graph inputs `utility` [B] and `focus` [B, C] (FP32). The production flavour draws the noise
    in the graph; the verification flavour takes it as inputs `noise_utility` and `noise_focus` shaped
    like the logits, so every backend can be compared element-wise. Both share every other node.
    `noise`: how the production flavour makes fresh N(0, 1), one of NOISE_METHODS (see _DrawnNoise).
    `key`: makes the production flavour's noise keyed instead of fresh (see _KeyedNoise).
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
        ops.graph.nodes.append(
            gs.Node(
                producer.op, name=name, attrs=attrs, inputs=list(producer.inputs), outputs=[out], domain=producer.domain
            )
        )
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
    elif key is not None:
        source = _KeyedNoise(key.constants(classes), axis, classes, rank)
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
    key: NoiseKey | None = None,
) -> torch.Tensor:
    """The PyTorch reference of `add_redistribution`: the same statement, the same FP32 arithmetic.
    Noise not given is drawn from `generator`, as the production flavour draws it in the graph, or
    with `key`, keyed as a keyed production graph draws it."""
    rank = logits.dim()
    axis = class_axis % rank
    if key is not None:
        noise = _KeyedNoise(key.constants(logits.shape[axis]), axis, logits.shape[axis], rank)
    else:
        noise = _TorchNoise(noise_utility, noise_focus, axis, generator)
    return redistribute(_TorchOps(logits.dtype), lambda: logits, utility.float(), focus.float(), noise, rank, axis)
