"""FP16 written into the ONNX graph, the TensorRT 11 way: the builder is never asked for reduced precision.

Every FP32 tensor of the model becomes FP16, except in nodes kept in FP32: the redistribution
subgraph (every node named under redistribution.PREFIX: the noise arithmetic stays FP32,
docs/method.md §4), any node whose name starts with a prefix the family's config lists (e.g. rotary
embeddings), and nodes that carry subgraphs (a model's If, Loop, Scan stay whole in FP32, their
inner nodes included) unless they are the region's own (named under PREFIX): those are converted branch by
branch, node by node. Explicit Casts sit at every edge between the two regions, and the graph's inputs and
outputs keep their types, so clients and the manifest see the same interface in both precisions.

Why not onnxconverter-common's `convert_float_to_float16` (what Polygraphy's --fp-to-fp16 calls)?
Tried with 1.16.0 on these graphs: with a node block list it casts every blocked node's output
to FP16 and back even between two blocked nodes (the noise n1 went through FP16), and it leaves
`Cast(to=FLOAT)` nodes producing tensors it retyped as FP16 (the Llama graph no longer loads).
This pass decides each tensor's type from the ONNX operator schemas instead: an input or output
becomes FP16 only where the op's type constraint allows tensor(float16) (Resize's `scales`, for
example, stays FP32).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from aim.contract import PREFIX
from aim.errors import InvalidGraphError
from aim.weights import WeightsFile, external_tensors, read_blocks, where

FP16_MAX = float(np.finfo(np.float16).max)  # 65504: FP32 constants beyond it are clamped (e.g. masks of -3.4e38)
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_CAST_PREFIX = "fp16"  # names of the Casts this pass adds on the FP16 side


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _schema(node: onnx.NodeProto, opset: int):
    try:
        return onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None


def _allows_half(schema, formal) -> bool:
    if formal.type_str.startswith("tensor("):
        return formal.type_str == "tensor(float16)"
    allowed = next((c.allowed_type_strs for c in schema.type_constraints if c.type_param_str == formal.type_str), [])
    return "tensor(float16)" in allowed


def _formal(params, index: int):
    if index < len(params):
        return params[index]
    last = params[-1] if params else None
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    return last if last is not None and last.option == variadic else None


def _half_tensor(tensor: TensorProto, name: str | None = None) -> TensorProto:
    values = np.clip(numpy_helper.to_array(tensor).astype(np.float32), -FP16_MAX, FP16_MAX)
    return numpy_helper.from_array(values.astype(np.float16), name if name is not None else tensor.name)


class _HalfWeights:
    """FP16 copies of weights kept in an external data file: read, converted and appended to `weights`
    block by block, so memory holds a block however large the tensor. The FP16 graphs of a build
    share `weights`: a weight they all use is written once. Weights held in the graph stay in it."""

    def __init__(self, weights: WeightsFile | None, weights_dir):
        self.weights, self.weights_dir = weights, weights_dir

    def __call__(self, tensor: TensorProto, name: str) -> TensorProto:
        if not external_data_helper.uses_external_data(tensor):
            return _half_tensor(tensor, name)
        if self.weights is None:
            raise InvalidGraphError(
                f"{tensor.name!r} is kept in an external data file: converting it needs a file for the FP16 weights"
            )
        half = TensorProto(name=name, data_type=HALF, dims=tensor.dims)
        key = where(tensor)

        def blocks():  # FP32 blocks read, clipped in place and converted: memory holds a block, not the tensor
            for fp32 in read_blocks(tensor, self.weights_dir):
                yield np.clip(fp32, -FP16_MAX, FP16_MAX, out=fp32).astype(np.float16)

        return self.weights.add(half, blocks, key)


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors a subgraph reads from the scopes around it."""
    defined = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in _subgraphs(node):
            used.update(_free_names(sub))
        defined.update(node.output)
    return used - defined


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]):
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for sub in _subgraphs(node):
            _rename_inputs(sub, renames)


def _collect_types(graph: onnx.GraphProto, types: dict[str, int]):
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        for sub in _subgraphs(node):
            _collect_types(sub, types)


class _Converter:
    """Converts one graph (and, recursively, the subgraphs of PREFIX-named nodes) in place."""

    def __init__(self, prefixes: tuple[str, ...], opset: int, types: dict[str, int], half: _HalfWeights):
        self.prefixes, self.opset, self.types, self.half = prefixes, opset, types, half

    def _convert_model_node(self, node: onnx.NodeProto, as_type, new_type: dict):
        """A node of the model: FP32 tensors become FP16 wherever its schema allows tensor(float16)."""
        types = self.types
        schema = _schema(node, self.opset)
        for i, name in enumerate(node.input):
            if types.get(name) != FLOAT:
                continue
            formal = _formal(schema.inputs, i) if schema else None
            want = HALF if formal is not None and _allows_half(schema, formal) else FLOAT
            node.input[i] = as_type(name, want, _CAST_PREFIX)
        output_half = False
        for i, name in enumerate(node.output):
            formal = _formal(schema.outputs, i) if schema else None
            if types.get(name) == FLOAT and formal is not None and _allows_half(schema, formal):
                new_type[name] = HALF
                output_half = True
            else:
                new_type[name] = types.get(name)
        if output_half:
            for attribute in node.attribute:  # ops whose output type is set by an attribute
                if attribute.name in ("to", "dtype") and attribute.i == FLOAT:
                    attribute.i = HALF
                elif attribute.name == "value" and attribute.t.data_type == FLOAT:
                    attribute.t.CopyFrom(_half_tensor(attribute.t))

    def convert(self, graph: onnx.GraphProto, outer: dict[str, int | None], outer_initializers: dict[str, TensorProto]):
        types = self.types
        initializers = {**outer_initializers, **{init.name: init for init in graph.initializer}}
        new_type: dict[str, int | None] = dict(outer)
        new_type.update({i.name: types.get(i.name) for i in graph.input})
        new_type.update({i.name: i.data_type for i in graph.initializer})
        nodes: list[onnx.NodeProto] = []
        new_initializers: list[TensorProto] = []
        casts: dict[tuple[str, int], str] = {}
        prefixes = self.prefixes

        def as_type(name: str, want: int, owner: str) -> str:
            """`name` as a tensor of element type `want` (FLOAT or FLOAT16): itself, or a Cast / FP16 copy."""
            have = new_type.get(name)
            if not name or have is None or have == want or have not in (FLOAT, HALF):
                return name
            key = (name, want)
            if key not in casts:
                tag = "fp32" if want == FLOAT else "fp16"
                if name in initializers and want == HALF:
                    copy = self.half(initializers[name], f"{name}/fp16")
                    new_initializers.append(copy)
                    casts[key] = copy.name
                else:
                    side = owner if want == FLOAT else _CAST_PREFIX
                    nodes.append(
                        helper.make_node(
                            "Cast", [name], [f"{name}/{tag}"], name=f"{side}/Cast_to_{tag}/{name}", to=want
                        )
                    )
                    casts[key] = f"{name}/{tag}"
                new_type[casts[key]] = want
            return casts[key]

        for node in graph.node:
            named = node.name.startswith(prefixes)
            has_subgraphs = any(True for _ in _subgraphs(node))
            if named or has_subgraphs:
                owner = next((p for p in prefixes if node.name.startswith(p)), node.name or node.op_type)
                if named and has_subgraphs:
                    # Model nodes the region moved into its branches (the logits' producer) come back out,
                    # so they compute in FP16 exactly as in the bare graph, Cast to FP32 outside the If.
                    hoisted, weights = _hoist_shared_nodes(node, prefixes)
                    for weight in weights:
                        graph.initializer.append(weight)
                        initializers[weight.name] = weight
                        new_type[weight.name] = weight.data_type
                    for inner in hoisted:
                        self._convert_model_node(inner, as_type, new_type)
                        nodes.append(inner)
                for i, name in enumerate(node.input):
                    if types.get(name) == FLOAT:
                        node.input[i] = as_type(name, FLOAT, owner)
                # Branches read FP16 tensors of this graph through Casts to FP32, placed before the node.
                renames = {}
                for sub in _subgraphs(node):
                    for name in _free_names(sub):
                        if types.get(name) == FLOAT and new_type.get(name) == HALF:
                            renames[name] = as_type(name, FLOAT, owner)
                for sub in _subgraphs(node):
                    _rename_inputs(sub, renames)
                if named:
                    # The region's own control flow: its branches are converted node by node, by name.
                    for sub in _subgraphs(node):
                        self.convert(sub, new_type, {**initializers, **{i.name: i for i in new_initializers}})
                for name in node.output:
                    new_type[name] = types.get(name)
                nodes.append(node)
                continue
            self._convert_model_node(node, as_type, new_type)
            nodes.append(node)

        # Outputs keep their types: an output computed in FP16 gets a Cast back under its own name.
        for output in graph.output:
            if types.get(output.name) == FLOAT and new_type.get(output.name) == HALF:
                inner = f"{output.name}/fp16"
                for node in nodes:
                    node.output[:] = [inner if n == output.name else n for n in node.output]
                    node.input[:] = [inner if n == output.name else n for n in node.input]
                nodes.append(
                    helper.make_node(
                        "Cast", [inner], [output.name], name=f"{_CAST_PREFIX}/Cast_output/{output.name}", to=FLOAT
                    )
                )

        used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        for node in nodes:
            for sub in _subgraphs(node):
                used |= _free_names(sub)
        kept = [init for init in graph.initializer if init.name in used] + [
            i for i in new_initializers if i.name in used
        ]
        local = {i.name for i in graph.input} | {i.name for i in kept} | set(outer) | set(outer_initializers)
        del graph.node[:]
        graph.node.extend(_toposort(nodes, local))
        del graph.initializer[:]
        graph.initializer.extend(kept)
        del graph.value_info[:]


def _hoist_shared_nodes(
    node: onnx.NodeProto, prefixes: tuple[str, ...]
) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Model nodes (not under `prefixes`) that every branch of `node` computes identically from outer
    tensors and weights: removed from the branches and returned with their weights, to run once
    before `node`."""
    branches = list(_subgraphs(node))
    if len(branches) < 2:
        return [], []

    def candidates(graph):
        free = _free_names(graph)
        weights = {init.name: init for init in graph.initializer}
        found = {}
        for inner in graph.node:
            if inner.name.startswith(prefixes) or len(inner.output) != 1 or any(True for _ in _subgraphs(inner)):
                continue
            if all(not name or name in free or name in weights for name in inner.input):
                key = (
                    inner.domain,
                    inner.op_type,
                    tuple(inner.input),
                    tuple(a.SerializeToString() for a in inner.attribute),
                    tuple(weights[name].SerializeToString() for name in inner.input if name in weights),
                )
                found[key] = inner
        return found

    found = [candidates(graph) for graph in branches]
    hoisted, moved = [], {}
    for key in set(found[0]).intersection(*found[1:]):
        copy = onnx.NodeProto()
        copy.CopyFrom(found[0][key])
        hoisted.append(copy)
        for graph, by_key in zip(branches, found):
            inner = by_key[key]
            graph.node.remove(inner)
            _rename_inputs(graph, {inner.output[0]: copy.output[0]})
            for output in graph.output:
                if output.name == inner.output[0]:  # the branch returned it: return it through an Identity
                    graph.node.append(
                        helper.make_node(
                            "Identity", [copy.output[0]], [output.name], name=f"{node.name}/Identity/{output.name}"
                        )
                    )
            still_used = {name for n in graph.node for name in n.input} | _free_names(graph)
            for init in list(graph.initializer):
                if init.name in inner.input and init.name not in still_used:
                    moved.setdefault(init.name, init)
                    graph.initializer.remove(init)
    return hoisted, list(moved.values())


def convert_to_fp16(
    model: onnx.ModelProto, keep_fp32: tuple[str, ...] = (), weights: WeightsFile | None = None, weights_dir=None
) -> onnx.ModelProto:
    """A copy of `model` computing in FP16, with nodes named under PREFIX or a `keep_fp32` prefix in FP32.

    Weights that `model` keeps in an external data file (read from `weights_dir`) get their FP16
    copies written to `weights`, one tensor at a time; weights in the graph are converted in it."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as error:
        raise InvalidGraphError(
            f"fp16 conversion needs the element type of every tensor; shape inference failed: {error}"
        ) from error
    types: dict[str, int] = {}
    _collect_types(inferred.graph, types)
    _Converter((PREFIX, *keep_fp32), _opset(model), types, _HalfWeights(weights, weights_dir)).convert(
        inferred.graph, {}, {}
    )
    result = onnx.shape_inference.infer_shapes(inferred, strict_mode=True)
    if not external_tensors(result):  # in memory, the checker would look for data files in the working directory
        onnx.checker.check_model(result)  # (save_onnx checks the file as written)
    return result


def _toposort(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """Casts were appended where first needed; order every node after its producers."""
    available = set(available) | {""}
    pending, ordered = list(nodes), []
    while pending:
        remaining = []
        for node in pending:
            needs = set(node.input)
            for sub in _subgraphs(node):
                needs |= _free_names(sub)
            if needs <= available:
                ordered.append(node)
                available.update(node.output)
            else:
                remaining.append(node)
        if len(remaining) == len(pending):
            missing = sorted(set().union(*(set(n.input) for n in remaining)) - available)[:5]
            raise InvalidGraphError(f"fp16 conversion left a graph that cannot be ordered; missing tensors {missing}")
        pending = remaining
    return ordered


def fp32_violations(model: onnx.ModelProto, prefixes: tuple[str, ...] = (PREFIX,)) -> list[str]:
    """Nodes under `prefixes` that read or write an FP16 tensor, other than the Casts at the region's
    edge (which read FP16 and write FP32). Empty when the region computes entirely in FP32."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)
    }
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    bad = []

    def walk(graph: onnx.GraphProto):
        for value in (*graph.input, *graph.output, *graph.value_info):
            types.setdefault(value.name, value.type.tensor_type.elem_type)
        for node in graph.node:
            in_region = node.name.startswith(prefixes)  # by name: a model node moved into a branch is the model's
            if in_region:
                edge_cast = node.op_type == "Cast" and onnx.helper.get_attribute_value(node.attribute[0]) == FLOAT
                tensors = list(node.output) if edge_cast else [*node.input, *node.output]
                half = [t for t in tensors if t and types.get(t) == HALF]
                if half:
                    bad.append(f"{node.name} ({node.op_type}) touches FP16 tensors {half}")
            for sub in _subgraphs(node):
                walk(sub)

    walk(inferred.graph)
    return bad
