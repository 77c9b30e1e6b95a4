"""What the redistribution costs a decode step, with every variant in one session:
`python -m aim.benchmarks.generation_cost` (figures and commands in docs/results.md).

Two ONNX Runtime sessions of the very same 135M graph, in one process, ran its decode step up to 24%
apart (CPU time, interleaved, busy machine): where a session's weights land in memory moved the step
more than the redistribution does. `make bench` compares sessions (the engine's and the bare graph's),
so its engine / bare figures carry that as a bias its paired interval cannot see. Here the variants
share one session: the model's logits go into a balanced tree of Ifs, selected by bool inputs
`select0..`, whose leaves are the variants, each a copy of the bare logits or a redistribution subgraph
(an ONNX file x [B, C] -> logits taking `utility` and `focus`, as `aim modulate` makes from an identity
graph, e.g. with an older checkout's code). ONNX Runtime runs the chosen branch only (outside Ifs it runs
every node, whatever the outputs asked for), so the variants share the weights, their memory and the
tree's overhead (every leaf at the same depth). Timing as the bench's: rounds of every variant in turn
(rotating start), CPU time, figures the median of per-round ratios with the distribution-free interval
(confidence.median_interval).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path

import numpy as np

from aim.benchmarks.confidence import CONFIDENCE, median_interval

BARE = "bare"  # a leaf that copies the model's logits
SELECT = "select"  # the tree's bool inputs: select0 (root) .. select{depth - 1}
TREE_LOGITS = "variants_tree/model_logits"  # what the model's logits output becomes inside the tree graph


def identity_graph(path: str | Path, classes: int) -> Path:
    """x [batch, classes] -> logits: what `aim modulate` splices a subgraph onto, to make a leaf."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", classes])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return Path(path)


def _leaf(name: str, source: str | None, logits: str):
    """A branch graph computing leaf `name` from the outer scope's `logits`, `utility` and `focus`."""
    import onnx
    from onnx import TensorProto, helper

    out = f"variants_tree/leaf/{name}"
    if source is None:
        nodes, initializers = [helper.make_node("Identity", [logits], [out], name=f"{name}/copy")], []
    else:
        graph = onnx.load(source).graph
        outer = {graph.input[0].name: logits, "utility": "utility", "focus": "focus"}

        def renamed(tensor: str) -> str:
            return outer.get(tensor, f"{name}/{tensor}") if tensor else tensor

        def rename(g):  # every name under the leaf's, subgraphs too; the outer inputs by theirs
            for node in g.node:
                node.name = f"{name}/{node.name}"
                node.input[:] = [renamed(t) for t in node.input]
                node.output[:] = [renamed(t) for t in node.output]
                for attribute in node.attribute:
                    if attribute.type == onnx.AttributeProto.GRAPH:
                        rename(attribute.g)
            for tensor in g.initializer:
                tensor.name = renamed(tensor.name)
            for info in [*g.value_info, *g.output]:
                info.name = renamed(info.name)

        rename(graph)
        nodes = [*graph.node, helper.make_node("Identity", [graph.output[0].name], [out], name=f"{name}/result")]
        initializers = list(graph.initializer)
    return helper.make_graph(
        nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializers
    )


def variants_tree(model: str | Path, leaves: dict[str, str | None], out: str | Path, logits: str = "logits") -> Path:
    """The model with its `logits` output computed by a tree of Ifs over `leaves` ({name: subgraph file,
    or None for a copy of the bare logits}; a power of two of them). `out` must lie in the model's folder
    when its weights are in an external data file (ONNX Runtime reads them only from there)."""
    import onnx
    from onnx import TensorProto, helper

    from aim.files import atomic_path

    names = list(leaves)
    depth = int(math.log2(len(names))) if names else 0
    if not names or 2**depth != len(names):
        raise ValueError(f"give a power of two of leaves (pad with {BARE} copies), got {len(names)}")
    proto = onnx.load(str(model), load_external_data=False)
    (info,) = [o for o in proto.graph.output if o.name == logits]
    for node in proto.graph.node:
        node.output[:] = [TREE_LOGITS if t == logits else t for t in node.output]
        node.input[:] = [TREE_LOGITS if t == logits else t for t in node.input]

    def tree(items: list[str], level: int, path: str):
        if len(items) == 1:
            return _leaf(items[0], leaves[items[0]], TREE_LOGITS)
        half = len(items) // 2
        result = f"variants_tree/{path or 'root'}"
        node = helper.make_node(
            "If",
            [f"{SELECT}{level}"],
            [result],
            name=f"{result}/If",
            then_branch=tree(items[:half], level + 1, path + "0"),
            else_branch=tree(items[half:], level + 1, path + "1"),
        )
        return helper.make_graph([node], result, [], [helper.make_tensor_value_info(result, TensorProto.FLOAT, None)])

    root = tree(names, 0, "")
    (node,) = root.node
    node.output[:] = [logits]
    proto.graph.node.append(node)
    classes = info.type.tensor_type.shape.dim[1]
    focus = helper.make_tensor_value_info("focus", TensorProto.FLOAT, ["batch", classes.dim_value or classes.dim_param])
    proto.graph.input.extend(
        [helper.make_tensor_value_info("utility", TensorProto.FLOAT, ["batch"]), focus]
        + [helper.make_tensor_value_info(f"{SELECT}{level}", TensorProto.BOOL, []) for level in range(depth)]
    )
    with atomic_path(Path(out)) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)


def selection(index: int, depth: int) -> dict[str, np.ndarray]:
    """The select inputs of leaf `index`: the root's then-branch holds the first half of the leaves."""
    return {f"{SELECT}{level}": np.array(not (index >> (depth - 1 - level)) & 1) for level in range(depth)}


class Leaves:
    """One session of a variants tree; `run(name)` computes the model and that leaf."""

    def __init__(
        self, tree: str | Path, leaves: list[str], inputs: dict, utility: float, threads: int = 1, profile_prefix=None
    ):
        import onnxruntime as ort

        from aim.runtime.onnxruntime import session_options

        options = session_options(threads, spinning=False)
        if profile_prefix is not None:
            options.enable_profiling, options.profile_file_prefix = True, str(profile_prefix)
        self.session = ort.InferenceSession(str(tree), options, providers=["CPUExecutionProvider"])
        self.names = list(leaves)
        depth = int(math.log2(len(self.names)))
        batch = next(iter(inputs.values())).shape[0]
        classes = [o for o in self.session.get_outputs() if o.name == "logits"][0].shape[1]
        knobs = {"utility": np.full(batch, utility, np.float32), "focus": np.zeros((batch, classes), np.float32)}
        self.feeds = {name: {**inputs, **knobs, **selection(i, depth)} for i, name in enumerate(self.names)}

    def run(self, name: str) -> list[np.ndarray]:
        return self.session.run(None, self.feeds[name])

    def logits(self, name: str) -> np.ndarray:
        return self.session.run(["logits"], self.feeds[name])[0]

    def time(self, rounds: int, per_round: int = 2, warmup: int = 2, clock=time.process_time) -> dict[str, np.ndarray]:
        """ms per run of each leaf, per round, by `clock` (CPU time: what other processes on a busy machine
        disturb least; time.perf_counter: wall time, as `make bench`): every leaf `per_round` times in
        turn, each round starting one leaf further; the garbage collector waits for the end of a round."""
        samples = {name: [] for name in self.names}
        for index in range(warmup + rounds):
            order = self.names[index % len(self.names) :] + self.names[: index % len(self.names)]
            gc.collect()
            gc.disable()
            try:
                for name in order:
                    start = clock()
                    for _ in range(per_round):
                        self.run(name)
                    if index >= warmup:
                        samples[name].append((clock() - start) / per_round * 1e3)
            finally:
                gc.enable()
        return {name: np.asarray(values) for name, values in samples.items()}


def profile(tree: str | Path, leaves: list[str], inputs: dict, utility: float, runs: int, threads: int = 1) -> dict:
    """{leaf: {node: median kernel time in us}} of the nodes ONNX Runtime's profiler records while running
    each leaf `runs` times (the Ifs' own times include their branches' nodes)."""
    import json
    import tempfile

    profiled = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in leaves:
            session = Leaves(tree, leaves, inputs, utility, threads, profile_prefix=f"{folder}/{len(profiled)}")
            for _ in range(runs):
                session.run(name)
            events = json.loads(Path(session.session.end_profiling()).read_text())
            times = {}
            for event in events:
                if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                    times.setdefault(event["name"][: -len("_kernel_time")], []).append(event["dur"])
            profiled[name] = {node: float(np.median(values)) for node, values in times.items()}
    return profiled


def ratios(times: dict[str, np.ndarray], pairs: list[tuple[str, str]], level: float = CONFIDENCE) -> list[dict]:
    """a / b per round for each pair: the median, its distribution-free interval, and a - b in ms."""
    found = []
    for a, b in pairs:
        value, low, high = median_interval(times[a] / times[b], level)
        difference = median_interval(times[a] - times[b], level)
        found.append({"figure": f"{a} / {b}", "value": value, "low": low, "high": high, "difference_ms": difference})
    return found


def _profile_line(name: str, nodes: dict[str, float]) -> str:
    """A leaf's profile: the model's nodes and the leaf's (If nodes, which hold their branches', left out of
    the sums), and the leaf's slowest nodes."""
    leaf = {node[len(name) + 1 :]: us for node, us in nodes.items() if node.startswith(f"{name}/")}
    model = sum(us for node, us in nodes.items() if not node.startswith((f"{name}/", "variants_tree")))
    summed = sum(us for node, us in leaf.items() if not node.rsplit("/", 1)[-1].startswith("If"))
    slowest = sorted(leaf.items(), key=lambda item: -item[1])[:12]
    shown = ", ".join(f"{node} {us:.0f}" for node, us in slowest)
    return f"{name}: model nodes {model / 1e3:.2f} ms; its own nodes {summed:.0f} us; slowest (us, median): {shown}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m aim.benchmarks.generation_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("model", help="the exported model (its weights may be in an external data file beside it)")
    parser.add_argument("--inputs", required=True, help=".npz of the model's inputs (e.g. a decode step)")
    parser.add_argument("--leaf", action="append", required=True, help=f"NAME=SUBGRAPH.onnx, or NAME={BARE}")
    parser.add_argument("--ratio", action="append", default=[], help="A/B: a figure, leaf A's time over leaf B's")
    parser.add_argument("--utility", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="CPU time (default) or wall time")
    parser.add_argument(
        "--profile", type=int, default=0, help="N: print each leaf's slowest nodes over N profiled runs"
    )
    parser.add_argument("--tree", help="where to write the tree graph (default: variants_tree.onnx beside the model)")
    args = parser.parse_args(argv)
    leaves = {}
    for item in args.leaf:
        name, _, source = item.partition("=")
        leaves[name] = None if source == BARE else source
    tree = variants_tree(args.model, leaves, args.tree or Path(args.model).with_name("variants_tree.onnx"))
    inputs = dict(np.load(args.inputs))
    if args.profile:
        for name, nodes in profile(tree, list(leaves), inputs, args.utility, args.profile, args.threads).items():
            print(_profile_line(name, nodes))
        return
    runs = Leaves(tree, list(leaves), inputs, args.utility, args.threads)
    times = runs.time(args.rounds, clock=time.process_time if args.clock == "cpu" else time.perf_counter)
    print(
        f"{args.rounds} rounds, {args.threads} thread(s), utility {args.utility:g}, {args.clock} ms per run (median):"
    )
    print("  " + ", ".join(f"{name} {np.median(t):.2f}" for name, t in times.items()))
    for figure in ratios(times, [tuple(r.split("/")) for r in args.ratio]):
        d = figure["difference_ms"]
        print(
            f"  {figure['figure']}: {figure['value']:.4f} ({figure['low']:.4f}..{figure['high']:.4f}); "
            f"difference {d[0]:+.3f} ms ({d[1]:+.3f}..{d[2]:+.3f})"
        )


if __name__ == "__main__":
    main()
