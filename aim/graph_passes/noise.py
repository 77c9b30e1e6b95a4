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
import onnx

from aim.contract import NOISE_METHODS
from aim.graph_passes.noise_key import ABSORB_ROUNDS, PRIME, PROJECTIONS, KeyedConstants
from aim.lazy import lazy_import

torch = lazy_import("torch")  # TorchNoise only

# Box-Muller's first uniform is drawn from [TINY, 1) so that log() never sees 0; it bounds |n1| by
# sqrt(-2 ln TINY) = 13.2, a tail of probability 1e-38, far below what a float32 uniform resolves.
TINY = float(np.finfo(np.float32).tiny)
# Keyed noise (KeyedNoise): the digest's quantization step in units of the row's sigma (RMS logit
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


class GivenNoise:
    """The verification flavour: n1 and n2 are graph inputs shaped like the logits; focus takes n2 at
    the focused classes only."""

    def __init__(self, noise_utility, noise_focus, class_axis: int):
        self.noise_utility, self.noise_focus, self.class_axis = noise_utility, noise_focus, class_axis

    def draw(self, ops, z, classes, utility):
        return self.noise_utility, ops.gather(self.noise_focus, classes, self.class_axis)


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


class KeyedNoise:
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
