"""Where the redistribution's noise comes from: every source draws n1 (shaped like the logits) and n2
(the focused classes only) through the ops of either interpreter (graph_passes/ops.py).

- GivenNoise: the verification flavour, noise as graph inputs (element-wise comparable across backends);
- DrawnNoise: the production flavour, fresh noise from one random node per run;
- KeyedNoise: the production flavour, noise as a function of a secret key and the request;
- TorchNoise: the PyTorch twin's, given tensors or drawn from a torch.Generator.
The keyed noise's key and the constants derived from it live in graph_passes/noise_key.py: the build, the
CLI and the manifest handle the key (its file, its fingerprint) without loading any graph machinery.
"""

from __future__ import annotations

import math

import numpy as np

from aim.contract import NOISE_METHODS
from aim.graph_passes.noise_key import ABSORB_ROUNDS, PRIME, PROJECTIONS, KeyedConstants
from aim.lazy import lazy_import

onnx = lazy_import("onnx")  # DrawnNoise's attributes: the keyed checks import this module's constants alone
torch = lazy_import("torch")  # TorchNoise only

# Box-Muller's first uniform is drawn from [TINY, 1) so that log() never sees 0; it bounds |n1| by
# sqrt(-2 ln TINY) = 13.2, a tail of probability 1e-38, far below what a float32 uniform resolves.
TINY = float(np.finfo(np.float32).tiny)
# Keyed noise of logits with positions (CellKeyedNoise): the digest's quantization step in units of the
# row's sigma (RMS logit units). On the digits classifier at the sigma of 50% agreement, sigma/4 kept
# the tier's agreement about as steady across keys as independent draws (135 distinct draws among 360
# test images) while 1/255 pixel perturbations bought a fresh draw 7% of the time.
DIGEST_STEP = 0.25
# Keyed noise of rows [B, C] (SmoothKeyedNoise): the lattice's cell width in units of the row's sigma
# (RMS logit units). It trades what averaging perturbed copies gains against how much distinct inputs
# with close logits share their noise. Measured (24 keys, docs/keyed-noise.md) on the digits ResNet and
# a user's MLP at the sigma of 50% agreement, the mean of 64 copies whose every pixel moved by +-4
# levels (logits moved by 0.02 sigma) gained over one copy: width 0.25 sigma +0.031 and +0.039, 0.35
# +0.015 and +0.016, 0.5 +0.007 and +0.013 (fresh noise +0.49 and +0.48). The price: images of one digit
# (0.07-0.16 sigma apart) share more of their draw, so one key's tier strays further from the theory
# (key-to-key sd of one query's agreement 0.06, 0.08, 0.11 on the digits, fresh noise 0.02; 0.02, 0.02,
# 0.04 on the MLP). 0.5 keeps the gain under 0.03 for nearly every key on both.
CELL_WIDTH = 0.5
# Rows at utility 0 whose focus noise is keyed: the step or width in logit units, sigma being 0.
FOCUS_ONLY_STEP = 1.0
# The resolution at which sigma itself is absorbed: tiers 2**-16 apart draw independent noise.
TIER_RESOLUTION = 2.0**16


class GivenNoise:
    """The verification flavour: n1 and n2 are graph inputs shaped like the logits; focus takes n2 at
    the focused classes only."""

    def __init__(self, noise_utility, noise_focus, class_axis: int):
        self.noise_utility, self.noise_focus, self.class_axis = noise_utility, noise_focus, class_axis

    def draw(self, ops, z, classes, utility):
        return self.noise_utility, ops.gather(self.noise_focus, classes, self.class_axis)

    def draw_tiles(self, ops, zs, tiles, classes, utility):
        """n2, and n1 block by block (a generator, in tiles.blocks()' order)."""
        n1 = self.noise_utility
        return ops.gather(self.noise_focus, classes, self.class_axis), (
            ops.slice(n1, start, stop, self.class_axis) for start, stop in tiles.blocks()
        )


class DrawnNoise:
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

    def _random(self, ops, z, size, like=onnx.TensorProto.FLOAT):
        """The one random node, over a tensor shaped like `z` with `size` entries on the class axis: N(0, 1)
        (method "normal") or uniform in [TINY, 1) (Box-Muller's: log() never sees 0). No seed: TensorRT
        ignores seeds, and every run must draw afresh. The shape comes from a tensor of type `like` (maps:
        bool, a quarter of a float one's bytes)."""
        axis, i64 = self.axis, np.int64
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
        like = ops.node(
            "ConstantOfShape",
            [shape],
            {"value": onnx.helper.make_tensor("value", like, [1], [0])},
            dtype=onnx.helper.tensor_dtype_to_np_dtype(like),
        )
        if self.method == "normal":
            return ops.node("RandomNormalLike", [like], {"dtype": onnx.TensorProto.FLOAT, "mean": 0.0, "scale": 1.0})
        return ops.node("RandomUniformLike", [like], {"dtype": onnx.TensorProto.FLOAT, "low": TINY, "high": 1.0})

    def draw(self, ops, z, classes, utility):
        axis, i64 = self.axis, np.int64
        n1_size = ops.constant([self.classes], i64)
        total = ops.node("Add", [n1_size, ops.node("Shape", [classes], dtype=i64)], dtype=i64)  # C + K
        axes = ops.constant([axis], i64)
        if self.method == "normal":
            normal = self._random(ops, z, total)
        else:
            half = ops.node(
                "Div", [ops.node("Add", [total, ops.constant([1], i64)], dtype=i64), ops.constant([2], i64)], dtype=i64
            )
            whole = ops.node("Mul", [half, ops.constant([2], i64)], dtype=i64)
            uniform = self._random(ops, z, whole)
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

    def draw_tiles(self, ops, zs, tiles, classes, utility):
        """n2, and n1 block by block (a generator, in tiles.blocks()' order) from the same one draw: n1 of
        pair p is the cosine and sine of slots p and half + p (method "normal": slot = class), n2 the
        slots after n1's (Box-Muller: a cosine from two uniforms per focused class)."""
        axis, i64, half, count = self.axis, np.int64, tiles.half, self.classes
        focused = ops.node("Shape", [classes], dtype=i64)  # [K]
        first = count if self.method == "normal" else 2 * half  # n2's first slot
        end = ops.node("Add", [ops.constant([first], i64), focused], dtype=i64)
        if self.method == "normal":
            draw = self._random(ops, zs[0], end, onnx.TensorProto.BOOL)
            return ops.slice_between(draw, ops.constant([first], i64), end, axis), (
                ops.slice(draw, start, stop, axis) for start, stop in tiles.blocks()
            )
        total = ops.node("Add", [end, focused], dtype=i64)
        draw = self._random(ops, zs[0], total, onnx.TensorProto.BOOL)
        r = _radius(ops, ops.slice_between(draw, ops.constant([first], i64), end, axis))
        n2 = ops.mul(r, ops.cos(_angle(ops, ops.slice_between(draw, end, total, axis))))
        return n2, _box_muller_tiles(ops, lambda start, stop: ops.slice(draw, start, stop, axis), tiles, count, axis)


class _KeyedGenerator:
    """The counter-based generator of keyed noise: integer Mul, Add and Mod only (TensorRT has no bitwise
    operators), in int64 modulo PRIME, where cubing is a permutation."""

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

    def _counters(self, ops, slots):
        """Class slot j -> (j * multiplier + offset) mod PRIME."""
        k, i64 = self.k, np.int64
        scaled = ops.add(ops.mul(slots, ops.constant(k.class_multiplier, i64)), ops.constant(k.class_offset, i64))
        return ops.mod(scaled, ops.constant(PRIME, i64))

    @staticmethod
    def _unit(ops, x):
        """A cubed hash (30 bits) as a uniform in (0, 1], exact in FP32 arithmetic."""
        return ops.mul(ops.add(ops.to_float32(x), ops.constant(1.0)), ops.constant(2.0**-30))

    def _box_muller(self, ops, halves, uniform, classes, axis: int):
        """n1 for every class and n2 for the focused `classes`, by Box-Muller. `halves` = (a, b): the
        uniforms of n1's C' / 2 pairs (C' = C rounded up to even; slots 0 .. C'/2 - 1 give the radii,
        C'/2 .. C' - 1 the angles), each pair a cosine and a sine normal; n2's two uniforms per class take
        `uniform` of the slots after them (computed for the K focused classes only)."""
        r, theta = _radius(ops, halves[0]), _angle(ops, halves[1])
        n1 = ops.concat([ops.mul(r, ops.cos(theta)), ops.mul(r, ops.sin(theta))], axis)
        if self.classes % 2:  # an odd C drops the last sine
            n1 = ops.slice(n1, 0, self.classes, axis)
        return n1, self._focus_noise(ops, uniform, classes)

    def _focus_noise(self, ops, uniform, classes):
        """n2 for the focused `classes`: two uniforms of their own per normal, from the slots after n1's
        (so a class's focus noise does not depend on which classes are focused)."""
        even = self.classes + self.classes % 2

        def focused(start):
            return uniform(ops.add(classes, ops.constant(start, np.int64)))

        return ops.mul(_radius(ops, focused(even)), ops.cos(_angle(ops, focused(even + self.classes))))


def _box_muller_tiles(ops, uniforms, tiles, count: int, axis: int):
    """n1 of `count` classes block by block, in tiles.blocks()' order, by Box-Muller: pair p's uniforms are
    uniforms(p, p + 1) (the radius) and uniforms(half + p, half + p + 1) (the angle), its cosine class p and
    its sine class half + p (an odd count drops the last sine). A generator: each block's nodes are made
    just before the block is used."""
    half = tiles.half
    for p0, p1 in tiles.pairs:
        r, theta = _radius(ops, uniforms(p0, p1)), _angle(ops, uniforms(half + p0, half + p1))
        yield ops.mul(r, ops.cos(theta))
        if half + p0 < count:
            sine = ops.mul(r, ops.sin(theta))
            yield sine if half + p1 <= count else ops.slice(sine, 0, count - half - p0, axis)


def _radius(ops, a):
    return ops.sqrt(ops.mul(ops.log(a), ops.constant(-2.0)))


def _angle(ops, b):
    return ops.mul(b, ops.constant(2.0 * math.pi))


class CellKeyedNoise(_KeyedGenerator):
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

    def _pooled(self, ops, z):
        """[B, C']: the logits (or a block of their classes) averaged over the axes other than the batch
        and the classes."""
        other = [a for a in range(1, self.rank) if a != self.axis]
        return ops.reduce_mean(z, other) if other else z

    def _seed(self, ops, pooled, utility):
        """[B, 1] int64: the row's digest (from its pooled logits [B, C]) absorbed with the key."""
        k, i64 = self.k, np.int64
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

    def _uniform(self, ops, z, pooled, utility):
        """uniform(slots): (0, 1] shaped like z with class slots [J] (int64) on the class axis; `z` gives
        the positions (any block of the logits' classes will do), `pooled` the row's digest."""
        k, axis, rank, i64 = self.k, self.axis, self.rank, np.int64
        seed = ops.unsqueeze(self._seed(ops, pooled, utility), list(range(2, rank)))  # [B, 1, ..., 1]
        place = ops.mod(
            ops.add(
                ops.mul(ops.positions(z, axis, rank), ops.constant(k.position_multiplier, i64)),
                ops.constant(k.position_offset, i64),
            ),
            ops.constant(PRIME, i64),
        )
        position_hash = self._hash(ops, seed, place, k.position_rounds)  # like z, class axis 1

        def uniform(slots):
            counters = self._counters(ops, slots)
            class_hash = self._hash(ops, seed, ops.on_axis(counters, axis, rank), k.class_rounds)
            return self._unit(ops, self._cube(ops, ops.add(class_hash, position_hash)))

        return uniform

    def draw(self, ops, z, classes, utility):
        uniform = self._uniform(ops, z, self._pooled(ops, z), utility)
        axis, even = self.axis, self.classes + self.classes % 2
        pairs = uniform(ops.arange(z, axis, self.classes % 2))
        halves = ops.slice(pairs, 0, even // 2, axis), ops.slice(pairs, even // 2, even, axis)
        return self._box_muller(ops, halves, uniform, classes, axis)

    def draw_tiles(self, ops, zs, tiles, classes, utility):
        """n2, and n1 block by block (a generator, in tiles.blocks()' order): the values draw() gives
        those classes (Box-Muller's pair p: slots p and half + p), computed a tile of pairs at a time."""
        pooled = ops.concat(tiles.in_class_order([self._pooled(ops, z) for z in zs]), axis=1)
        uniform = self._uniform(ops, zs[0], pooled, utility)

        def slots(start, stop):
            return uniform(ops.constant(np.arange(start, stop), np.int64))

        return self._focus_noise(ops, uniform, classes), _box_muller_tiles(ops, slots, tiles, self.classes, self.axis)


class SmoothKeyedNoise(_KeyedGenerator):
    """Keyed noise of logits [B, C] that changes smoothly with the request: an input perturbed a little
    gets nearly the same draw, so averaging perturbed repeats gains next to nothing, while requests
    whose logits lie cells apart draw independent noise.

    The row's centred logits, projected on the key's PROJECTIONS +-1 directions and divided by a cell
    width of CELL_WIDTH sigma (RMS logit units), shifted by a keyed phase, fall in one simplex of the
    keyed lattice (Kuhn's triangulation of the unit cells: the cell's corner, then one coordinate
    stepped up at a time in the order of the fractional parts, largest first). Each of its
    PROJECTIONS + 1 vertices, with the tier, seeds an independent N(0, 1) draw of every class; the
    noise is their sum weighted by the point's barycentric coordinates scaled to unit length. So
    given the key and the request every logit's noise is exactly N(0, 1) and the classes independent
    (the weights' squares sum to 1); a vertex enters or leaves the simplex with weight 0, so the draw
    is continuous in the logits, and two requests' noise correlate as much as their weights overlap:
    1 - O((move / width)**2) for a small move, 0 for requests no vertex apart.

    An element's uniform is cube(class_hash + vertex_seed): the class hash is the key's alone (CLASS_ROUNDS
    cubings of the slot's keyed counter, computed at build time and held by the graph), the vertex seed
    absorbs the vertex's coordinates and the tier, so the full-size [B, PROJECTIONS + 1, C] draw costs one
    cubing per element.
    """

    def __init__(self, constants: KeyedConstants, num_classes: int):
        if constants.projection.shape[0] != num_classes:
            raise ValueError(
                f"keyed constants for {constants.projection.shape[0]} classes, the logits have {num_classes}"
            )
        self.k, self.classes, self.dims = constants, num_classes, constants.projection.shape[1]
        # The class hash of n1's slots 0 .. C' - 1 (C' = C rounded up to even) depends on the key alone:
        # computed here once, by the generator's own statement, and held by the graph (4 bytes per class;
        # below PRIME < 2**31) instead of CLASS_ROUNDS cubings of C' counters at every run.
        even = num_classes + num_classes % 2
        slots = np.arange(even, dtype=np.int64)
        start = _IntegerOps.constant(constants.class_start)
        hashed = self._hash(_IntegerOps, start, self._counters(_IntegerOps, slots), constants.class_rounds)
        self.class_hash = hashed.astype(np.int32)

    def _simplex(self, ops, z, utility):
        """The vertices' seeds [B, V, 1] (int64) and weights [B, V] (squares summing to 1), V = dims + 1."""
        k, m, i64 = self.k, self.dims, np.int64
        centred = ops.sub(z, ops.reduce_mean(z, [1], keepdims=True))
        projected = ops.matmul(centred, ops.to_float32(ops.constant(k.projection, np.float16)))  # [B, m]
        sigma = ops.where(ops.greater(utility, 0.0), utility, ops.constant(FOCUS_ONLY_STEP))
        width = ops.mul(sigma, ops.constant(CELL_WIDTH * math.sqrt(self.classes)))  # +-1 projections: RMS * sqrt(C)
        point = ops.clip(
            ops.nan_to(ops.add(ops.div(projected, ops.unsqueeze(width, [1])), ops.constant(k.offsets)), 0.0),
            -(2.0**28),
            2.0**28,
        )
        corner = ops.floor(point)
        fraction = ops.sub(point, corner)  # [B, m] in [0, 1)
        # order[b, i]: how many fractions of the row sort before fraction i (descending; ties by index)
        mine, theirs = ops.unsqueeze(fraction, [2]), ops.unsqueeze(fraction, [1])  # [B, m, 1], [B, 1, m]
        earlier = ops.constant(np.tril(np.ones((m, m), dtype=bool), -1), dtype=bool)  # [i, j]: j < i
        before = ops.or_(ops.greater(theirs, mine), ops.and_(ops.equal(theirs, mine), earlier))
        order = ops.unsqueeze(ops.reduce_sum(ops.to_float32(before), [2]), [1])  # [B, 1, m]
        # Vertex v (0..m) is the corner with the coordinates of order < v stepped up by one.
        stepped = ops.to_int64(ops.less(order, ops.constant(np.arange(m + 1).reshape(m + 1, 1))))  # [B, V, m]
        vertices = ops.add(ops.unsqueeze(ops.add(ops.to_int64(corner), ops.constant(2**28, i64)), [1]), stepped)
        # Barycentric coordinates: 1 - f(0), f(0) - f(1), ..., f(m-1) with f(r) the r-th largest fraction.
        rth = ops.equal(order, ops.constant(np.arange(m).reshape(m, 1)))  # [B, m(r), m(i)]
        ordered = ops.reduce_sum(ops.mul(ops.to_float32(rth), ops.unsqueeze(fraction, [1])), [2])  # [B, m]
        weights = ops.concat(
            [
                ops.sub(ops.constant([[1.0]]), ops.slice(ordered, 0, 1, axis=1)),
                ops.sub(ops.slice(ordered, 0, m - 1, axis=1), ops.slice(ordered, 1, m, axis=1)),
                ops.slice(ordered, m - 1, m, axis=1),
            ],
            axis=1,
        )
        weights = ops.div(weights, ops.sqrt(ops.reduce_sum(ops.mul(weights, weights), [1], keepdims=True)))
        tier = ops.to_int64(ops.floor(ops.mul(utility, ops.constant(TIER_RESOLUTION))))  # <= MAX_STRENGTH: < PRIME
        words = [ops.slice(vertices, i, i + 1, axis=2) for i in range(m)] + [ops.unsqueeze(tier, [1, 2])]
        seed = ops.constant([[[k.absorb[0]]]], i64)
        for i, word in enumerate(words):
            seed = self._cube(ops, ops.add(seed, word))
            for _ in range(ABSORB_ROUNDS - 1):
                seed = self._cube(ops, ops.add(seed, ops.constant(k.absorb[i + 1], i64)))
        return seed, weights

    def draw(self, ops, z, classes, utility):
        k, i64 = self.k, np.int64
        seeds, weights = self._simplex(ops, z, utility)
        weights = ops.unsqueeze(weights, [2])  # [B, V, 1]

        def unit(class_hash):
            """(0, 1] [B, V, J] for the class hashes [J] (int64)."""
            return self._unit(ops, self._cube(ops, ops.add(seeds, class_hash)))

        def uniform(slots):
            return unit(self._hash(ops, ops.constant(k.class_start, i64), self._counters(ops, slots), k.class_rounds))

        # n1's class hashes are the key's alone: read from the graph, half for the radii, half for the angles.
        half = len(self.class_hash) // 2
        halves = [
            unit(ops.to_int64(ops.constant(self.class_hash[i * half : (i + 1) * half], np.int32))) for i in (0, 1)
        ]

        n1, n2 = self._box_muller(ops, halves, uniform, classes, 2)
        # [B, V, J] -> [B, J]: the vertices' draws blended by their weights. Blending each Box-Muller half
        # before the Concat saves ONNX Runtime nothing measurable and moves the twin's last bits (PyTorch
        # sums [B, V, J] in an order that depends on J), so the blend stays after it.
        return ops.reduce_sum(ops.mul(n1, weights), [1]), ops.reduce_sum(ops.mul(n2, weights), [1])


class _IntegerOps:
    """The integer ops of the keyed generator in numpy (int64, operands below 2**63 as the generator keeps
    them): a third interpreter of its statement, for the constants a keyed graph holds."""

    constant = staticmethod(lambda value, dtype=np.int64: np.array(value, dtype=dtype))
    add = staticmethod(np.add)
    mul = staticmethod(np.multiply)
    mod = staticmethod(np.mod)


def correlation_width(rank: int) -> float:
    """How far apart (RMS distance of the pooled, centred logits, in units of sigma) two requests' keyed
    noise stops being shared: the smooth lattice's cell width, or the digest's step."""
    return CELL_WIDTH if rank == 2 else DIGEST_STEP


def keyed_noise(key, class_axis: int, num_classes: int, rank: int):
    """The keyed noise of logits of this rank: smooth for rows [B, C]; the cell digest where the logits
    have positions (pixels, tokens), whose per-element cost the smooth blend would multiply."""
    constants = key.constants(num_classes)
    if rank == 2:
        return SmoothKeyedNoise(constants, num_classes)
    return CellKeyedNoise(constants, class_axis, num_classes, rank)


class TorchNoise(GivenNoise):
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

    def draw_tiles(self, ops, zs, tiles, classes, utility):
        z = ops.concat(tiles.in_class_order(zs), self.class_axis)  # the shape to draw (the twin: no memory to save)
        n1, n2 = self.draw(ops, z, classes, utility)
        return n2, (ops.slice(n1, start, stop, self.class_axis) for start, stop in tiles.blocks())
