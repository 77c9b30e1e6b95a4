"""Calibrated utility level: the engine takes `utility_level` [B] in [0, 1] instead of sigma.

A table of sigmas at evenly spaced levels (level 0 first, chance; level 1 last, sigma 0 = the exact
model) is embedded as a constant; the sigma of a level is read by Gather and linear interpolation
between the two neighbouring entries:

    x = clip(level, 0, 1) * (n - 1);  i = min(floor(x), n - 2);  sigma = t[i] + (x - i) * (t[i+1] - t[i])

so a monotone table gives a monotone, continuous level -> sigma map. A NaN level counts as 0 (chance:
fail closed), as a NaN utility counts as the strongest noise. The nodes are named under the
redistribution PREFIX so that an FP16 conversion keeps them in FP32 with the rest of the noise
arithmetic. Element-wise ops, Floor, Cast and Gather only: all parsed by TensorRT.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from aim.contract import MAX_STRENGTH, PREFIX, UTILITY, UTILITY_LEVEL
from aim.errors import InvalidGraphError, InvalidInputError

NAME = f"{PREFIX}/calibration"


def check_table(sigmas) -> np.ndarray:
    table = np.asarray(sigmas, dtype=np.float32)
    if table.ndim != 1 or table.size < 2:
        raise InvalidInputError(
            f"a calibration table needs at least 2 sigmas (levels 0..1), got shape {list(table.shape)}"
        )
    if not np.all(np.isfinite(table)) or np.any(table < 0) or np.any(table > MAX_STRENGTH):
        raise InvalidInputError(f"calibration sigmas must be finite and in [0, {MAX_STRENGTH:g}], got {table.tolist()}")
    if np.any(np.diff(table) > 0):
        raise InvalidInputError(
            f"calibration sigmas must not increase with the level (level 0 first), got {table.tolist()}"
        )
    return table


def add_utility_level(graph: gs.Graph, sigmas) -> gs.Graph:
    """Replaces the graph input `utility` (sigma) by `utility_level` [B] mapped through `sigmas`
    (the sigma at levels 0, 1/(n-1), ..., 1)."""
    table = check_table(sigmas)
    inputs = {tensor.name: tensor for tensor in graph.inputs}
    if UTILITY_LEVEL in graph.tensors():
        raise InvalidGraphError(f"the graph already has {UTILITY_LEVEL!r}: it is calibrated already")
    if UTILITY not in inputs:
        raise InvalidGraphError(f"the graph has no input {UTILITY!r}: modulate it first (add_redistribution)")
    utility = inputs[UTILITY]
    level_input = gs.Variable(UTILITY_LEVEL, dtype=np.float32, shape=list(utility.shape))
    count = 0

    def node(op, args, attrs=None, dtype=np.float32, out=None):
        nonlocal count
        count += 1
        name = f"{NAME}/{op}_{count}"
        out = out or gs.Variable(f"{name}/output", dtype=dtype)
        graph.nodes.append(gs.Node(op, name=name, inputs=args, outputs=[out], attrs=attrs or {}))
        return out

    def const(name, value):
        return gs.Constant(f"{NAME}/{name}", np.asarray(value))

    last = table.size - 1
    finite = node("Equal", [level_input, level_input], dtype=np.bool_)  # false only for NaN
    # Fail closed: a NaN level is level 0 (chance), never level 1 (the exact model).
    level = node("Where", [finite, level_input, const("nan_level", np.float32(0.0))])
    level = node("Clip", [level, const("zero", np.float32(0.0)), const("one_max", np.float32(1.0))])
    position = node("Mul", [level, const("steps", np.float32(last))])
    index = node("Min", [node("Floor", [position]), const("last_start", np.float32(last - 1))])
    fraction = node("Sub", [position, index])
    index = node("Cast", [index], {"to": onnx.TensorProto.INT64}, dtype=np.int64)
    low = node("Gather", [const("table", table), index], {"axis": 0})
    high = node("Gather", [const("table_next", table[1:].copy()), index], {"axis": 0})
    utility.name = f"{NAME}/{UTILITY}"  # now an internal tensor: the sigma the redistribution uses
    node("Add", [low, node("Mul", [fraction, node("Sub", [high, low])])], out=utility)
    graph.inputs = [level_input if tensor is utility else tensor for tensor in graph.inputs]
    return graph.cleanup().toposort()


def level_to_sigma(levels, sigmas) -> np.ndarray:
    """The host-side twin of the embedded map (NumPy, FP32): for tests and reports."""
    table = check_table(sigmas)
    x = np.asarray(levels, dtype=np.float32)
    x = np.clip(np.where(np.isnan(x), np.float32(0), x), 0, 1) * np.float32(table.size - 1)
    i = np.minimum(np.floor(x), table.size - 2)
    j = i.astype(np.int64)
    return table[j] + (x - i) * (table[j + 1] - table[j])
