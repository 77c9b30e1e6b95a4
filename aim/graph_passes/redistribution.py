"""AIM logits redistribution (docs/method.md §1, §4): the ONNX subgraph and its PyTorch twin.

    z' = z + utility * n1 + focus * |n2|        n1, n2 ~ N(0, 1) i.i.d. per element, fresh per call
                                                (or keyed: a function of a secret key and the request)

`redistribute` states the computation once, over a small set of ops; `GraphOps` emits it as ONNX nodes
and `TorchOps` evaluates it in PyTorch. The two implementations are tested against each other
(tests/graph_passes/test_redistribution.py, test_keyed.py), so they cannot drift apart silently.

What the statement adds to the bare formula, and why:
- Sanitising (the graph is served to clients that bypass our Python checks, e.g. through Triton):
  utility -> min(|utility|, MAX_STRENGTH) with NaN as MAX_STRENGTH (fail closed: the weakest tier,
  never the bare model), focus clipped to [-MAX_STRENGTH, MAX_STRENGTH] with NaN as 0. So no request
  can turn the logits into NaN or inf, nor buy the premium answer with a NaN.
- Skipping (the bench's "latency at utility 0 / bare"): when the whole batch asks for utility 0 and
  focus 0, an `If` returns the bare logits without drawing any noise; the bare logits' producer node is
  moved into both branches, so that branch writes straight into the output instead of copying it (FP32
  logits only: see movable_producer).
- Sparse focus (the bench's "subgraph cost"): focus noise is drawn only for the classes some sample
  focuses on (their indices -> Gather -> add -> ScatterElements back), not over the whole logits tensor.
- One draw (the bench's "subgraph cost"): the production flavour draws n1 and n2 from ONE random node
  (Box-Muller over one uniform draw by default, or one RandomNormalLike), so no second random node's
  seed can correlate with the first (see DrawnNoise). A uniform costs ONNX Runtime ~40% of a normal, but
  Box-Muller's extra passes take most of that back: `make bench` measures the two within 10%.
- Maps (the bench's "peak RSS"): segmentation logits (two axes of positions) are modulated block by
  block of the class axis (class_tiles.py): the upsampling, the noise and the sum per block, each
  block's focus written in it, the blocks concatenated into the output; a map's intermediates are
  hundreds of MiB, and ONNX Runtime runs no two-input element-wise op in place.
- TensorRT: no NonZero (TensorRT for RTX lacks it), no TopK (K <= 3840), no nested If (TensorRT for
  RTX fails to build them; a second If beside the first made its builder crash on Llama).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from aim.contract import FLAVOURS, FOCUS, MAX_STRENGTH, MODULATION_INPUTS, NOISE_INPUTS, PREFIX, UTILITY
from aim.errors import InvalidGraphError
from aim.graph_passes.class_tiles import ClassTiles, class_tiles
from aim.graph_passes.logits import class_axis_of, logits_output, movable_producer
from aim.graph_passes.noise import DrawnNoise, GivenNoise, TorchNoise, keyed_noise
from aim.graph_passes.noise_key import NoiseKey
from aim.graph_passes.ops import GraphOps, TorchOps
from aim.graph_passes.upsample import class_separable, resize_classes
from aim.lazy import lazy_import

torch = lazy_import("torch")  # the PyTorch twin only: emitting the graph needs no torch


def redistribute(ops, bare, utility, focus, noise, rank: int, class_axis: int, tiles: ClassTiles | None = None):
    """The one statement of the computation.

    `bare()` gives the bare logits (rank `rank`, batch on axis 0, classes on `class_axis`), `bare((start,
    stop))` those of classes [start, stop) only; a graph computes them inside the branch that uses them.
    `utility` [B] and `focus` [B, C] are the raw knobs; `noise.draw` supplies n1 (shaped like the logits)
    and n2 (shaped like the logits of the focused classes only); keyed noise reads the sanitised utility
    too. `tiles` (maps: class_tiles.py): the noisy branch works block by block of the class axis and
    concatenates the blocks, so that only a block of each intermediate is alive at a time.
    """
    # Fail closed: a NaN utility is the weakest tier (MAX_STRENGTH), never the bare model; a NaN focus is no focus.
    u = ops.minimum(ops.abs(ops.nan_to(utility, MAX_STRENGTH)), MAX_STRENGTH)
    # [B, C] 1.0 where a row focuses on a class: |focus| > 0, so a NaN focus is none (it is sanitised to 0
    # below). The focus itself is sanitised only where it is used, at the focused classes ([B, K]): the
    # whole [B, C] passes cost a decode step of a 49k vocabulary more than its noise (docs/results.md).
    focusing = ops.to_float32(ops.greater(ops.abs(focus), 0.0))
    active = ops.or_(ops.greater(ops.reduce_max(u), 0.0), ops.greater(ops.reduce_max(focusing), 0.0))
    # [K]: the classes some row focuses on. Outside the If, and no If inside it: TensorRT for RTX
    # fails to build nested Ifs.
    classes = ops.focused(focusing)
    other_axes = [axis for axis in range(1, rank) if axis != class_axis]

    def modulated():
        # Rows with utility 0 get z + 0 * n1 = z exactly, so one batch can mix service tiers.
        scale = ops.unsqueeze(u, list(range(1, rank)))
        f = ops.clip(ops.nan_to(ops.gather(focus, classes, 1), 0.0), -MAX_STRENGTH, MAX_STRENGTH)  # [B, K]
        strength = ops.unsqueeze(f, other_axes)
        if tiles is None:
            z = ops.to_float32(bare())  # the noise arithmetic is FP32 whatever the logits' type
            n1, n2 = noise.draw(ops, z, classes, u)
            z = ops.add(z, ops.mul(scale, n1))
            shifted = ops.add(ops.gather(z, classes, class_axis), ops.mul(strength, ops.abs(n2)))
            return ops.to_logits_dtype(ops.scatter(z, classes, shifted, class_axis, rank))
        spans = tiles.blocks()
        zs = [ops.to_float32(bare(span)) for span in spans]
        n2, n1s = noise.draw_tiles(ops, zs, tiles, classes, u)
        focus_noise = ops.mul(strength, ops.abs(n2))
        entries = ops.arange(classes, 0)  # 0 .. K - 1
        last = ops.sub(ops.count_below(classes, tiles.classes), ops.constant([1], np.int64))  # K - 1
        blocks = []
        for (start, stop), z, n1 in zip(spans, zs, n1s):  # n1s yields each block's noise just before its use
            z = ops.add(z, ops.mul(scale, n1))
            blocks.append(ops.to_logits_dtype(focus_block(z, start, stop, focus_noise, entries, last)))
        return ops.concat(tiles.in_class_order(blocks), class_axis)

    def focus_block(z, start, stop, focus_noise, entries, last):
        """The block of classes [start, stop) with the focus noise added at its focused classes, by one
        scatter of all K focused classes: a list of the block's own would have a size known only at run
        time, which TensorRT for RTX's builder fails on. The entries of classes outside the block write
        what the block's first focused class writes, where it writes it (or, with none, the block's first
        class unchanged), so that entries sharing a place write the same value."""
        i64 = np.int64
        inside = ops.and_(ops.less(ops.constant(start - 1, i64), classes), ops.less(classes, ops.constant(stop, i64)))
        first = ops.min_of(ops.count_below(classes, start), last)  # the block's first focused class, if any
        entry = ops.where(inside, entries, first)
        kept = ops.gather(inside, entry, 0)
        place = ops.where(kept, ops.gather(ops.sub(classes, ops.constant(start, i64)), entry, 0), ops.constant(0, i64))
        picked = ops.gather(z, place, class_axis)
        shifted = ops.add(picked, ops.gather(focus_noise, entry, class_axis))
        updates = ops.where(ops.on_axis(kept, class_axis, rank), shifted, picked)
        return ops.scatter_classes(z, place, updates, class_axis, rank)

    return ops.if_(active, modulated, bare)


def add_redistribution(
    graph: gs.Graph,
    logits: str = "logits",
    class_axis: int = 1,
    flavour: str = "production",
    noise: str = "box-muller",
    key: NoiseKey | None = None,
    tile_maps: bool = True,
) -> gs.Graph:
    """Splices the redistribution onto the output `logits`, which keeps its name, shape and dtype.

    Adds graph inputs `utility` [B] and `focus` [B, C] (FP32). The production flavour draws the noise
    in the graph; the verification flavour takes it as inputs `noise_utility` and `noise_focus` shaped
    like the logits, so every backend can be compared element-wise. Both share every other node.
    `noise`: how the production flavour makes fresh N(0, 1), one of NOISE_METHODS (see DrawnNoise).
    `key`: makes the production flavour's noise keyed instead of fresh (see noise.keyed_noise).
    `tile_maps`: maps are worked through in blocks of classes (class_tiles.py), for ONNX Runtime; TensorRT
    plans its own memory, and its builder wants more scratch for the blocks (TensorRT for RTX: more than
    its 16 GiB workspace at batch 32 and 1024 x 1024), so graphs for TensorRT are made whole (the same
    values: the twin tiles either way).
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
    z = logits_output(graph, logits)
    taken = [name for name in (*MODULATION_INPUTS, *NOISE_INPUTS) if name in graph.tensors()]
    if taken:
        raise InvalidGraphError(
            f"the graph already has tensors named {taken}: is it modulated already? Start from the bare model."
        )
    axis, classes = class_axis_of(z, class_axis)
    rank, shape, dtype = len(z.shape), list(z.shape), z.dtype
    batch = shape[0]

    ops = GraphOps(graph, dtype, classes)
    producer = movable_producer(graph, z)
    if producer is not None:
        graph.nodes.remove(producer)

    separable = producer is not None and class_separable(producer)
    wholes = {}  # per branch: the bare logits, which the blocks of a producer that is not separable slice

    def bare(span=None):
        if span is not None:
            if separable:  # the upsampling, done for the block's classes only
                return resize_classes(ops, producer, *span, rank=rank)
            if id(ops.graph) not in wholes:
                wholes[id(ops.graph)] = bare()
            return ops.slice(wholes[id(ops.graph)], *span, axis=axis)
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
        source = GivenNoise(*given, class_axis=axis)
    elif key is not None:
        source = keyed_noise(key, axis, classes, rank)
    else:
        source = DrawnNoise(axis, classes, noise)
    out = redistribute(
        ops,
        bare,
        utility,
        focus,
        source,
        rank=rank,
        class_axis=axis,
        tiles=class_tiles(rank, classes) if tile_maps else None,
    )
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
        noise = keyed_noise(key, axis, logits.shape[axis], rank)
    else:
        noise = TorchNoise(noise_utility, noise_focus, axis, generator)

    def bare(span=None):
        return logits if span is None else logits.narrow(axis, span[0], span[1] - span[0])

    tiles = class_tiles(rank, logits.shape[axis])
    return redistribute(TorchOps(logits.dtype), bare, utility.float(), focus.float(), noise, rank, axis, tiles)
