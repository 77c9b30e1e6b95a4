"""The figures of `make bench`: their names (as in bench.json and the table) and their targets.

Latency ratios are the modulated engine's over the bare engine's, on the same inputs; speed-ups and
tokens/s ratios are the engine's throughput over another's (above 1: the engine is faster).
"""

from __future__ import annotations

from aim.benchmarks.confidence import Target

# Latency of the modulated engine over the bare one (family benchmarks).
UTILITY_0 = "latency at utility 0 / bare"  # utility 0 and focus 0 for the whole batch: the subgraph is skipped
NOISE = "latency with noise / bare"  # utility > 0
NOISE_FOCUS = "latency with noise and focus / bare"  # utility > 0 and focus on one class
KEYED = " (keyed)"  # the same figure for the keyed-noise engine
# Engine over eager PyTorch (the reference code: host noise from torch.normal), same batch.
SPEEDUP_0 = "engine speed-up over eager PyTorch, utility 0"
SPEEDUP_NOISE = "engine speed-up over eager PyTorch + torch.normal, with noise"
# The subgraph alone, on a logits tensor: its cost (net of an identity graph) over one RandomNormalLike's.
SUBGRAPH = "subgraph cost / one RandomNormalLike"
# Single measurements: no interval, a verdict from the value itself.
ENGINE_BYTES = "engine bytes the subgraph adds"
# Peak RSS (memory.py): the engine as shipped over the bare model as a user runs it (ONNX Runtime's
# default session); the same with both as shipped; and both in ONNX Runtime's default session.
PEAK_RSS = "peak RSS, modulated / bare"
PEAK_RSS_SAME = "peak RSS, modulated / bare, both as shipped"
PEAK_RSS_DEFAULT = "peak RSS, modulated / bare, both in ONNX Runtime's default session"
# Latency of the bare engine as shipped over the same in ONNX Runtime's default session: what the
# shipped session options cost (maps: no memory pattern). Measured where they differ.
SESSION_COST = "latency, bare as shipped / in ONNX Runtime's default session"
MAKE_ENGINE = "make engine wall time"

# Generation (generation.py): tokens/s of the engine's decode loop over another's.
GENERATION_UTILITY = 3.0


def tokens_per_s(utility: float, peer: str, batched: int | None = None) -> str:
    shown = f"utility {utility:g}"
    return f"batched ({batched} prompts) tokens/s at {shown} / {peer}" if batched else f"tokens/s at {shown} / {peer}"


OPTIMUM, TRANSFORMERS, BARE_LOOP = "Optimum", "transformers eager", "bare loop"

TARGETS = {
    UTILITY_0: Target("<=", 1.02),
    UTILITY_0 + KEYED: Target("<=", 1.02),
    # NOISE's bound is the family's (Benchmark.noise_latency_bound): a segmentation map's noise costs more.
    SPEEDUP_0: Target(">=", 3.0),
    SPEEDUP_NOISE: Target(">=", 1.5),
    SUBGRAPH: Target("<=", 0.6),
    ENGINE_BYTES: Target("<=", 1_000_000),
    PEAK_RSS: Target("<=", 1.3),
    PEAK_RSS_SAME: Target("<=", 1.3),
    tokens_per_s(GENERATION_UTILITY, OPTIMUM): Target(">=", 1.0),
    tokens_per_s(0.0, BARE_LOOP): Target(">=", 0.97),
    tokens_per_s(GENERATION_UTILITY, BARE_LOOP): Target(">=", 0.97),
    tokens_per_s(GENERATION_UTILITY, OPTIMUM, batched=8): Target(">=", 1.0),
}


def noise_target(family: str) -> Target:
    """The family's bound on latency with noise / bare."""
    from aim.families import get_family

    return Target("<=", get_family(family).benchmark.noise_latency_bound)
