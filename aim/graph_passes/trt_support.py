"""Will TensorRT's ONNX parser take this graph? A check that runs on any machine, before any build.

The parser's operator matrix (ops, element types, restrictions) is data, in
data/tensorrt_onnx_support.json, transcribed from onnx-tensorrt's docs/operators.md (its "source"
field says which version). This module walks every node, including the subgraphs of If/Loop/Scan,
and lists what the parser would refuse, each with the node's name and the reason. The real parser
still has the last word at build time; this check names the node before a build is even attempted,
and runs where no TensorRT is installed.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from aim.errors import InvalidGraphError
from aim.graph_passes.io import load_onnx

TABLE = Path(__file__).parent / "data" / "tensorrt_onnx_support.json"

# ONNX element types under the names the matrix uses; anything else (strings, complex, 16-bit and
# unsigned >8-bit integers) has no TensorRT type at all.
_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
    getattr(TensorProto, "FLOAT4E2M1", -1): "FP4",
}
_CONTROL_FLOW = ("If", "Loop", "Scan")
_NONDETERMINISTIC = (
    "RandomNormal",
    "RandomNormalLike",
    "RandomUniform",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
)


class UnsupportedGraphError(InvalidGraphError):
    """The graph has nodes that TensorRT's ONNX parser does not take."""


@dataclass(frozen=True)
class Finding:
    node: str
    op: str
    reason: str
    severity: str = "error"  # "error": the parser refuses it; "warning": accepted, with a caveat
    graph: str = "main"

    def __str__(self) -> str:
        where = "" if self.graph == "main" else f" (in {self.graph})"
        return f"{self.severity}: node {self.node!r} ({self.op}){where}: {self.reason}"


@dataclass
class SupportReport:
    findings: list[Finding] = field(default_factory=list)
    nodes: int = 0
    table: str = ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        head = f"{self.nodes} nodes checked against {self.table}: "
        if self.ok:
            head += "all supported" + (f", {len(self.warnings)} warning(s)" if self.warnings else "")
        else:
            head += f"{len(self.errors)} unsupported"
        return "\n".join([head, *(f"  {f}" for f in self.findings)])

    def as_dict(self) -> dict:
        return {
            "table": self.table,
            "nodes": self.nodes,
            "passed": self.ok,
            "errors": [str(f) for f in self.errors],
            "warnings": [str(f) for f in self.warnings],
        }

    def raise_if_unsupported(self, what: str = "the graph"):
        if not self.ok:
            raise UnsupportedGraphError(
                f"TensorRT's ONNX parser would refuse {what}:\n"
                + "\n".join(f"  {f}" for f in self.errors)
                + "\nChange or remove these nodes (or export with a different opset), or use BACKEND=onnxruntime."
            )


@functools.cache
def load_table(path: str | os.PathLike = TABLE) -> dict:
    data = json.loads(Path(path).read_text())
    for amendment in data.get("amendments", []):
        entry = data["operators"][amendment["op"]]
        entry["types"] = entry.get("types", []) + [
            t for t in amendment.get("add_types", []) if t not in entry.get("types", [])
        ]
    rules: dict[str, list[dict]] = {}
    for rule in data["rules"]:
        rules.setdefault(rule["op"], []).append(rule)
    data["rules_by_op"] = rules
    return data


def table_name(table: dict, backend: str = "tensorrt") -> str:
    source = table["source"]
    extra = table.get("backends", {}).get(backend, {})
    differences = len(extra.get("unsupported_ops", {})) + len(extra.get("rules", []))
    specific = f"; {backend} {extra.get('version', '')}: {differences} known difference(s)" if differences else ""
    amended = f", {len(table.get('amendments', []))} amendment(s)" if table.get("amendments") else ""
    version = source["tensorrt_version"]
    return f"TensorRT {version} ONNX operator matrix (onnx-tensorrt docs/operators.md{amended}{specific})"


class _Scope:
    """What is known about the tensors of one graph (and, through `outer`, of the graphs around it)."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None = None):
        self.outer = outer
        self.types: dict[str, int] = {}
        self.values: dict[str, np.ndarray] = {}
        self.constant: set[str] = set()
        self.consumed: set[str] = set()
        self.graph_outputs = {o.name for o in graph.output}
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                self.types[value.name] = value.type.tensor_type.elem_type
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            self.constant.add(init.name)
            if init.data_location != TensorProto.EXTERNAL and _small(init.dims):
                self.values[init.name] = numpy_helper.to_array(init)
        for node in graph.node:
            self.consumed.update(node.input)
            if node.op_type == "Constant":
                self.constant.update(node.output)
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.types[node.output[0]] = value.data_type
                    if _small(value.dims):
                        self.values[node.output[0]] = numpy_helper.to_array(value)
            elif (
                node.op_type not in _NONDETERMINISTIC
                and node.op_type not in _CONTROL_FLOW
                and node.input
                and all(not name or self.is_constant(name) for name in node.input)
            ):
                self.constant.update(node.output)  # folded to a constant by the parser

    def _lookup(self, table: str, name: str):
        """`name` in this scope's `table` (types or values), else in the enclosing graphs'."""
        scope = self
        while scope is not None:
            if name in getattr(scope, table):
                return getattr(scope, table)[name]
            scope = scope.outer
        return None

    def type_of(self, name: str) -> int | None:
        return self._lookup("types", name)

    def is_constant(self, name: str) -> bool:
        return name in self.constant or (self.outer is not None and self.outer.is_constant(name))

    def value_of(self, name: str):
        return self._lookup("values", name)


def _small(dims) -> bool:
    return int(np.prod(dims)) <= 1024 if len(dims) else True


def _attribute(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return None


def _decoded(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(v) for v in value]
    return value


def _subgraphs(node: onnx.NodeProto):
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            for index, graph in enumerate(attribute.graphs):
                yield f"{attribute.name}[{index}]", graph


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for _, sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _check_rule(rule: dict, node: onnx.NodeProto, scope: _Scope) -> str | None:
    """The reason `node` breaks `rule`, or None."""
    kind = rule["kind"]
    if kind == "constant_input":
        index = rule["input"]
        if index >= len(node.input) or not node.input[index]:
            return None  # optional input left out: the default applies
        name = node.input[index]
        if not scope.is_constant(name):
            return f"{rule['reason']} (input {index} {name!r} is computed at run time)"
        value = scope.value_of(name)
        if value is None:
            return None
        if "below" in rule and np.any(np.asarray(value) >= rule["below"]):
            return f"{rule['reason']} (got {np.asarray(value).tolist()})"
        if "equals" in rule and np.any(np.asarray(value) != rule["equals"]):
            return f"{rule['reason']} (got {np.asarray(value).tolist()})"
        return None
    if kind == "attribute_in":
        value = _decoded(_attribute(node, rule["attribute"]))
        value = rule.get("default") if value is None else value
        if value not in rule["allowed"]:
            return f"{rule['reason']} ({rule['attribute']}={value!r}; allowed: {rule['allowed']})"
        return None
    if kind == "attribute_absent":
        present = [name for name in rule["attributes"] if _attribute(node, name) is not None]
        return f"{rule['reason']} (has {present})" if present else None
    if kind == "attribute_ignored":
        return rule["reason"] if _attribute(node, rule["attribute"]) is not None else None
    if kind == "output_unused":
        index = rule["output"]
        if (
            index < len(node.output)
            and node.output[index]
            and node.output[index] in scope.consumed | scope.graph_outputs
        ):
            return f"{rule['reason']} (output {index} {node.output[index]!r} is used)"
        return None
    if kind == "all_ones":
        value = _attribute(node, rule["attribute"])
        return (
            f"{rule['reason']} ({rule['attribute']}={list(value)})"
            if value is not None and any(v != 1 for v in value)
            else None
        )
    if kind == "spatial_rank_in":
        value = _attribute(node, rule["attribute"])
        if value is not None and len(value) not in rule["allowed"]:
            return f"{rule['reason']} ({rule['attribute']} has {len(value)} dims)"
        return None
    if kind == "no_nested":
        nested = [
            inner.name for _, graph in _subgraphs(node) for inner in _all_nodes(graph) if inner.op_type == rule["op"]
        ]
        return f"{rule['reason']} (contains {nested})" if nested else None
    if kind == "branch_outputs_distinct":
        then_branch, else_branch = _attribute(node, "then_branch"), _attribute(node, "else_branch")
        if then_branch is None or else_branch is None:
            return None
        shared = {o.name for o in then_branch.output} & {o.name for o in else_branch.output}
        if shared:
            return f"{rule['reason']} (both branches output {sorted(shared)})"
        for a, b in zip(then_branch.output, else_branch.output):
            ra, rb = (
                len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None for o in (a, b)
            )
            if ra is not None and rb is not None and ra != rb:
                return f"{rule['reason']} ({a.name!r} has rank {ra}, {b.name!r} rank {rb})"
        return None
    raise ValueError(f"unknown rule kind {kind!r} in {TABLE.name}")


def _check_types(node: onnx.NodeProto, entry: dict, table: dict, scope: _Scope, graph: str) -> list[Finding]:
    spec = table["typed_by"].get(node.op_type, table["typed_by"]["default"])
    if spec == "none" or "types" not in entry:
        return []
    findings = []
    for part in spec.split(","):
        side, index = part.split(":")
        names = node.input if side == "input" else node.output
        if int(index) >= len(names) or not names[int(index)]:
            continue
        elem = scope.type_of(names[int(index)])
        if node.op_type in ("Cast",) and side == "output":
            elem = _attribute(node, "to")
        if elem is None:
            continue  # unknown after shape inference: the parser will tell
        type_name = _TYPE_NAMES.get(elem, onnx.helper.tensor_dtype_to_string(elem).removeprefix("TensorProto."))
        name = node.name or node.output[0]
        if type_name in table["types"]["cast_down"]:
            findings.append(
                Finding(
                    name,
                    node.op_type,
                    f"{side} {index} is {type_name}: {table['types']['cast_down'][type_name]}",
                    "warning",
                    graph,
                )
            )
        elif type_name not in entry["types"]:
            findings.append(
                Finding(
                    name,
                    node.op_type,
                    f"{side} {index} is {type_name}; TensorRT takes {node.op_type} in {', '.join(entry['types'])}",
                    "error",
                    graph,
                )
            )
    return findings


def _check_graph(
    graph: onnx.GraphProto,
    table: dict,
    functions: dict,
    path: str,
    outer: _Scope | None,
    report: SupportReport,
    backend: dict,
):
    scope = _Scope(graph, outer)
    for node in graph.node:
        report.nodes += 1
        name = node.name or (node.output[0] if node.output else node.op_type)
        if node.domain not in ("", "ai.onnx"):
            if (node.domain, node.op_type) in functions:
                body = functions[(node.domain, node.op_type)]
                _check_graph(
                    onnx.helper.make_graph(body.node, body.name, [], []),
                    table,
                    functions,
                    f"{path}/{name}",
                    scope,
                    report,
                    backend,
                )
                continue
            report.findings.append(
                Finding(
                    name,
                    f"{node.domain}.{node.op_type}",
                    "not a standard ONNX op: TensorRT needs a plugin for it",
                    "error",
                    path,
                )
            )
            continue
        entry = table["operators"].get(node.op_type)
        if entry is None:
            report.findings.append(Finding(name, node.op_type, "not in TensorRT's ONNX operator matrix", "error", path))
            continue
        if not entry["supported"]:
            detail = f": {entry['restrictions']}" if "restrictions" in entry else ""
            report.findings.append(
                Finding(name, node.op_type, f"not supported by TensorRT's ONNX parser{detail}", "error", path)
            )
            continue
        if node.op_type in backend.get("unsupported_ops", {}):
            report.findings.append(
                Finding(
                    name,
                    node.op_type,
                    f"not supported by {backend['name']}: {backend['unsupported_ops'][node.op_type]}",
                    "error",
                    path,
                )
            )
            continue
        report.findings.extend(_check_types(node, entry, table, scope, path))
        for rule in [
            *table["rules_by_op"].get(node.op_type, []),
            *(r for r in backend.get("rules", []) if r["op"] == node.op_type),
        ]:
            reason = _check_rule(rule, node, scope)
            if reason:
                severity = "warning" if rule["kind"] == "attribute_ignored" else "error"
                report.findings.append(Finding(name, node.op_type, reason, severity, path))
        for attribute, subgraph in _subgraphs(node):
            _check_graph(subgraph, table, functions, f"{path}/{name}.{attribute}", scope, report, backend)


def check_tensorrt_support(
    model: onnx.ModelProto | str | os.PathLike, table: dict | None = None, backend: str = "tensorrt"
) -> SupportReport:
    """Every node of `model` (a ModelProto or a path) against the parser's operator matrix, and the
    known differences of `backend` ("tensorrt" or "tensorrt-rtx")."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)  # without its weights; a clear error for a missing or unreadable file
    table = table or load_table()
    if backend not in table.get("backends", {}):
        raise ValueError(f"no TensorRT backend {backend!r} in {TABLE.name}; known: {sorted(table.get('backends', {}))}")
    extra = {"name": backend, **table["backends"][backend]}
    report = SupportReport(table=table_name(table, backend))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high = table["opset"]["min"], table["opset"]["max"]
    if opset is None or not low <= opset <= high:
        report.findings.append(
            Finding("(model)", "opset", f"opset {opset} is outside the parser's range {low}..{high}")
        )
    try:  # strict: the default mode stops at the first inconsistency without a word
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # element types of intermediate tensors
    except Exception as error:  # the ops are still checked; the element types of their tensors are not
        try:
            inferred = onnx.shape_inference.infer_shapes(model)  # what it could infer before it stopped
        except Exception:
            inferred = model
        report.findings.append(
            Finding(
                "(model)",
                "shape inference",
                f"ONNX shape inference failed ({type(error).__name__}: "
                f"{str(error).strip().splitlines()[0][:200]}), so the element "
                f"types of some intermediate tensors are unknown and were NOT checked against the parser's types; "
                f"fix the graph so that `onnx.shape_inference.infer_shapes` runs, then check again",
                "warning",
            )
        )
    initializers = {init.name for init in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        if value.type.tensor_type.HasField("shape") and len(value.type.tensor_type.shape.dim) == 0:
            report.findings.append(
                Finding(
                    f"(input {value.name})",
                    "graph input",
                    "rank 0: Triton's batching (max_batch_size > 0) needs a batch dimension on every input; "
                    "give it shape [batch]",
                )
            )
    functions = {(f.domain, f.name): f for f in model.functions}
    _check_graph(inferred.graph, table, functions, "main", None, report, extra)
    return report
