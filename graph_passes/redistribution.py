"""AIM logits redistribution (SPEC sections 1, 4): the ONNX subgraph and its PyTorch twin.

    z' = z + utility * n1 + focus * |n2|        n1, n2 ~ N(0, 1) i.i.d. per element, fresh per call

`redistribute` states the formula once, over a tiny set of ops; `_GraphOps` emits it as ONNX nodes and
`_TorchOps` evaluates it in PyTorch. The two implementations are tested against each other
(tests/graph_passes/test_redistribution.py), so they cannot drift apart silently.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from errors import InvalidGraphError, InvalidInputError

PREFIX = "aim_redistribution"  # every node of the subgraph: fp16 conversion keeps them in FP32
UTILITY = "utility"  # FP32 [B]: per-sample sigma in logit units, so a batch can mix service tiers
FOCUS = "focus"  # FP32 [B, C]: signed per-class strength (> 0 boosts, < 0 suppresses)
NOISE_UTILITY = "noise_utility"  # verification flavour only: n1, shaped like the logits
NOISE_FOCUS = "noise_focus"  # verification flavour only: n2, shaped like the logits
FLAVOURS = ("production", "verification")
# Largest |utility| or |focus| accepted, in logit units. Logit gaps of real models are tens of units,
# so every model is at chance long before this; beyond it the noise could overflow FP16 logits.
MAX_STRENGTH = 1e4
MODULATION_INPUTS = (UTILITY, FOCUS)
NOISE_INPUTS = (NOISE_UTILITY, NOISE_FOCUS)


def redistribute(ops, z, utility, focus, noise_utility, noise_focus, rank: int, class_axis: int):
    """The one statement of the math: logits `z` of `rank` with the batch on axis 0 and classes on
    `class_axis`; `utility` [B] and `focus` [B, C] broadcast onto them."""
    u = ops.unsqueeze(utility, list(range(1, rank)))
    f = ops.unsqueeze(focus, [axis for axis in range(1, rank) if axis != class_axis])
    return ops.add(ops.add(z, ops.mul(u, noise_utility)), ops.mul(f, ops.abs(noise_focus)))


class _TorchOps:
    @staticmethod
    def unsqueeze(x, axes):
        for axis in sorted(axes):
            x = x.unsqueeze(axis)
        return x

    mul = staticmethod(torch.mul)
    add = staticmethod(torch.add)
    abs = staticmethod(torch.abs)


class _GraphOps:
    """Appends one ONNX node per op to `graph`, every node named under PREFIX."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.count = 0

    def node(self, op: str, inputs: list, attrs: dict | None = None) -> gs.Variable:
        self.count += 1
        name = f"{PREFIX}/{op}_{self.count}"
        out = gs.Variable(f"{name}/output", dtype=np.float32)
        self.graph.nodes.append(gs.Node(op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {}))
        return out

    def unsqueeze(self, x, axes):
        if not axes:
            return x
        axes_tensor = gs.Constant(f"{PREFIX}/axes_{self.count + 1}", np.array(axes, dtype=np.int64))
        return self.node("Unsqueeze", [x, axes_tensor])

    def mul(self, a, b):
        return self.node("Mul", [a, b])

    def add(self, a, b):
        return self.node("Add", [a, b])

    def abs(self, x):
        return self.node("Abs", [x])

    def random_normal_like(self, x):
        # mean 0, scale 1 and no seed: TensorRT ignores seeds, and every call must draw afresh.
        return self.node("RandomNormalLike", [x], {"dtype": onnx.TensorProto.FLOAT, "mean": 0.0, "scale": 1.0})

    def cast(self, x, to: int):
        out = self.node("Cast", [x], {"to": to})
        out.dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
        return out


def _logits_output(graph: gs.Graph, logits: str) -> gs.Variable:
    outputs = {tensor.name: tensor for tensor in graph.outputs}
    if logits not in outputs:
        raise InvalidGraphError(
            f"the graph has no output named {logits!r}; its outputs are {sorted(outputs)}. "
            f"Pass the name of the logits output (--logits NAME)."
        )
    return outputs[logits]


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


def add_redistribution(
    graph: gs.Graph, logits: str = "logits", class_axis: int = 1, flavour: str = "production"
) -> gs.Graph:
    """Splices the redistribution onto the output `logits`, which keeps its name, shape and dtype.

    Adds graph inputs `utility` [B] and `focus` [B, C] (FP32). The production flavour draws the noise
    in the graph (RandomNormalLike); the verification flavour takes it as inputs `noise_utility` and
    `noise_focus` shaped like the logits, so every backend can be compared element-wise.
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

    # The bare logits get a new name; the modulated output takes over the name that clients know.
    z.name = f"{PREFIX}/{logits}_bare"
    ops = _GraphOps(graph)
    z32 = z if dtype == np.float32 else ops.cast(z, onnx.TensorProto.FLOAT)  # noise arithmetic in FP32
    utility = gs.Variable(UTILITY, dtype=np.float32, shape=[batch])
    focus = gs.Variable(FOCUS, dtype=np.float32, shape=[batch, classes])
    graph.inputs.extend([utility, focus])
    if flavour == "verification":
        noise = [gs.Variable(name, dtype=np.float32, shape=shape) for name in NOISE_INPUTS]
        graph.inputs.extend(noise)
    else:
        # n2 is drawn "like" n1, not like z: two random nodes on one input could be merged by an
        # optimizer (common subexpression), which would correlate the two noises (SPEC section 4).
        n1 = ops.random_normal_like(z32)
        noise = [n1, ops.random_normal_like(n1)]
    out = redistribute(ops, z32, utility, focus, *noise, rank=rank, class_axis=axis)
    if dtype != np.float32:
        out = ops.cast(out, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
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
    """The PyTorch reference of `add_redistribution`: same formula, same FP32 arithmetic. Noise not
    given is drawn from `generator`, as the production flavour draws it in the graph."""
    rank = logits.dim()
    axis = class_axis % rank
    z = logits.float()
    if noise_utility is None:
        noise_utility = torch.randn(z.shape, generator=generator)
    if noise_focus is None:
        noise_focus = torch.randn(z.shape, generator=generator)
    out = redistribute(_TorchOps, z, utility.float(), focus.float(), noise_utility, noise_focus, rank, axis)
    return out.to(logits.dtype)


def check_modulation(utility, focus, batch: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validates runtime knobs and returns them as FP32 `[B]` and `[B, C]` arrays.

    `utility`: a number (every sample) or one value per sample; finite and >= 0 (a sigma in logit
    units). `focus`: None (no focus), a `[C]` vector for every sample, or `[B, C]`; finite, any sign.
    """
    u = np.asarray(utility, dtype=np.float32)
    if u.ndim == 0:
        u = np.full([batch], u, dtype=np.float32)
    if u.shape != (batch,):
        raise InvalidInputError(f"utility must be a number or have one value per sample ({batch}), got shape {list(u.shape)}")
    if not np.all(np.isfinite(u)):
        raise InvalidInputError(f"utility must be finite, got {u.tolist()}: NaN and inf have no noise level")
    if np.any(u < 0) or np.any(u > MAX_STRENGTH):
        raise InvalidInputError(
            f"utility is a noise scale in logit units and must lie in [0, {MAX_STRENGTH:g}], got {u.tolist()} "
            f"(0 = the original model)"
        )
    if focus is None:
        f = np.zeros([batch, num_classes], dtype=np.float32)
    else:
        f = np.asarray(focus, dtype=np.float32)
        if f.ndim == 1 and f.shape[0] == num_classes:
            f = np.broadcast_to(f, (batch, num_classes)).copy()
        if f.shape != (batch, num_classes):
            raise InvalidInputError(
                f"focus must have one value per class ({num_classes}), or shape [{batch}, {num_classes}] for "
                f"one vector per sample; got shape {list(f.shape)}"
            )
        if not np.all(np.isfinite(f)):
            raise InvalidInputError("focus must be finite: it holds NaN or inf")
        if np.any(np.abs(f) > MAX_STRENGTH):
            raise InvalidInputError(f"focus strengths must lie in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], got up to {np.abs(f).max():g}")
    return u, f


def focus_vector(num_classes: int, boost: dict[int, float] | None = None, suppress: dict[int, float] | None = None):
    """A dense `[C]` focus vector from {class: strength}: boosts positive, suppressions negative."""
    f = np.zeros([num_classes], dtype=np.float32)
    for sign, chosen in ((1.0, boost or {}), (-1.0, suppress or {})):
        for index, strength in chosen.items():
            if not 0 <= index < num_classes:
                raise InvalidInputError(f"class {index} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
            if not math.isfinite(strength) or not 0 <= strength <= MAX_STRENGTH:
                raise InvalidInputError(f"focus strength for class {index} must lie in [0, {MAX_STRENGTH:g}], got {strength}")
            f[index] = sign * strength
    return f
