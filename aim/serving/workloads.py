"""What a load test sends, and how it judges each reply.

Four workloads over the same samples, one sample per request (batch of one, as clients send):
  bare      the bare model (served as <model>-bare): every reply is the bare logits, bit for bit
  utility0  the modulated model, every request at utility 0 and focus 0: the bare logits, bit for bit
  mixed     the modulated model with the service tiers mixed: a third at utility 0 (bit for bit), a
            tenth focus-only (utility 0, one class boosted or suppressed: that class moves in its
            sign's direction and nothing else moves), the rest at utility 0.5-5 (finite, and noisy)
  tiered    the same mix through the tiered model (<model>-tiered, no utility input): the exact and
            focus-only requests carry the premium key (Authorization: Bearer KEY), the noisy ones
            none (the default tier): what the tiers cost beside `mixed`

Samples: the build's reference inputs (reference.npz), one row each; float inputs (images) are drawn
afresh from N(0, 1) so that requests differ, the others (token ids, masks) are the reference's. The
bare logits every check compares with come from ONNX Runtime on the build's bare graph, run here one
sample at a time: independent of the server and of how it batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aim.contract import FOCUS, UTILITY
from aim.layout import Manifest

WORKLOADS = ("bare", "utility0", "mixed", "tiered")
DEFAULT_SIGMA = 2.0  # the load test's default tier (the tiered workload's noisy requests)
EXACT_SHARE = 1 / 3  # of the mixed workload: utility 0, focus 0
FOCUS_SHARE = 1 / 10  # of the mixed workload: utility 0, one class focused
UTILITY_RANGE = (0.5, 5.0)  # the noisy tiers' sigma, uniform
FOCUS_STRENGTH = 4.0  # |w| of the focused class, in logit units
SAMPLES = 32  # distinct samples
REQUESTS = 256  # distinct requests per workload, sent in turn


@dataclass(frozen=True)
class Request:
    inputs: dict[str, np.ndarray]  # batch of one; utility [1, 1] and focus [1, C] for the modulated model
    kind: str  # exact | focus | noisy
    bare: np.ndarray  # the sample's bare logits
    focus_class: int = -1
    focus_sign: float = 0.0
    key: str | None = None  # the tiered workload: the premium key, or None for the default tier


def judge(request: Request, logits: np.ndarray, class_axis: int) -> bool:
    """Whether a reply is right for its request (module docstring)."""
    if logits is None or logits.shape != request.bare.shape or logits.dtype != request.bare.dtype:
        return False
    # Plain ufuncs, not np.array_equal / np.delete: the client shares the CPU with the server, so a
    # slow judge would lower the throughput it measures (the mixed workload's more than the others').
    if request.kind == "exact":
        return bool((logits == request.bare).all())
    if request.kind == "noisy":
        return bool(np.isfinite(logits).all() and not (logits == request.bare).all())
    moved = np.moveaxis(logits - request.bare, class_axis, 0)  # [C, ...]: per class, what the focus added
    own = moved[request.focus_class]
    return bool(np.count_nonzero(moved) == np.count_nonzero(own) > 0 and (own * request.focus_sign >= 0).all())


def samples(manifest: Manifest, seed: int = 0, count: int = SAMPLES) -> list[dict[str, np.ndarray]]:
    """`count` single-sample feeds of the model's own inputs (module docstring)."""
    from aim.verify.reference import Reference

    reference = Reference.load(manifest.path("reference"))
    rows = next(iter(reference.inputs.values())).shape[0]
    rng = np.random.default_rng(seed)
    feeds = []
    for index in range(count):
        feed = {}
        for name, array in reference.inputs.items():
            row = array[index % rows : index % rows + 1]
            if np.issubdtype(row.dtype, np.floating) and row.size:
                row = rng.standard_normal(row.shape).astype(row.dtype)
            feed[name] = np.ascontiguousarray(row)
        feeds.append(feed)
    return feeds


def bare_logits(manifest: Manifest, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The bare graph's logits of each feed, by ONNX Runtime here, one sample per run."""
    from aim.runtime.onnxruntime import OnnxRuntimeEngine

    with OnnxRuntimeEngine(manifest.graph_path("bare")) as engine:
        return [engine.infer(feed)[manifest.modulation.logits] for feed in feeds]


def workload(
    name: str,
    feeds: list[dict],
    bare: list[np.ndarray],
    num_classes: int,
    seed: int = 0,
    count: int = REQUESTS,
    premium_key: str | None = None,
) -> list[Request]:
    """The requests of one workload, `count` of them, cycling over the samples (tiered: with
    `premium_key` on the exact and focus-only ones)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    tiered = name == "tiered"
    rng = np.random.default_rng(seed + 1 + WORKLOADS.index("mixed" if tiered else name))  # tiered: mixed's draws
    requests = []
    for index in range(count):
        sample = index % len(feeds)
        if name == "bare":
            requests.append(Request(feeds[sample], "exact", bare[sample]))
            continue
        draw = rng.random() if name in ("mixed", "tiered") else 0.0
        utility, focus = 0.0, np.zeros((1, num_classes), np.float32)
        kind, focus_class, sign = "exact", -1, 0.0
        if EXACT_SHARE <= draw < EXACT_SHARE + FOCUS_SHARE:
            kind, focus_class, sign = "focus", int(rng.integers(num_classes)), float(rng.choice([-1.0, 1.0]))
            focus[0, focus_class] = sign * FOCUS_STRENGTH
        elif draw >= EXACT_SHARE + FOCUS_SHARE:
            kind, utility = "noisy", float(rng.uniform(*UTILITY_RANGE))
        knobs = {FOCUS: focus} if tiered else {UTILITY: np.array([[utility]], np.float32), FOCUS: focus}
        key = premium_key if tiered and kind != "noisy" else None
        requests.append(Request({**feeds[sample], **knobs}, kind, bare[sample], focus_class, sign, key))
    return requests
