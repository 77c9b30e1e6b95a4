"""The benchmark's machinery on a tiny model: figures, intervals, verdicts, checks and JSON (no timing
is asserted)."""

import json
import math

from aim.benchmarks import figures as names
from aim.benchmarks.confidence import MET, UNRESOLVED, Budget
from aim.benchmarks.run import run
from aim.benchmarks.timing import Rounds


def test_quick_bench_writes_every_figure_with_its_interval_and_its_engines_pass_the_checks(tmp_path):
    lines = []
    budget = Budget(seconds=0.0)  # no extra rounds: the machinery, not the figures
    results = run(
        ["resnet"], tmp_path, quick=True, make_engine=False, generation=False, budget=budget, log=lines.append
    )
    saved = json.loads((tmp_path / "bench.quick.json").read_text())
    assert saved["families"].keys() == {"resnet"} and saved["onnxruntime"]["intra_op_num_threads"] == 2
    family = results["families"]["resnet"]
    # The benchmarked modulated engine is still exact at utility 0 and statistically right.
    assert family["checks_passed"] and len(family["checks"]) >= 7
    assert family["keyed_checks_passed"] and len(family["keyed_checks"]) == 13  # and so is the keyed engine
    figures = family["figures"]
    latency = [names.UTILITY_0, names.NOISE, names.NOISE_FOCUS, names.SPEEDUP_0, names.SPEEDUP_NOISE]
    latency += [name + names.KEYED for name in (names.UTILITY_0, names.NOISE, names.NOISE_FOCUS)]
    for name in latency:  # every timed ratio: a median of the 3 pairs, and an interval (none at 3 pairs)
        figure = figures[name]
        assert figure["pairs"] == 3 and math.isfinite(figure["value"]) and figure["value"] > 0
        assert figure["low"] is None and figure["high"] is None  # too few pairs for a 95% interval
        assert figure.get("verdict") in (None, UNRESOLVED)  # so no target can be decided
    # The subgraph adds little to the engine file (the target is <= 1 MB): measured once, decided.
    assert figures[names.ENGINE_BYTES]["verdict"] == figures[names.ENGINE_BYTES + names.KEYED]["verdict"] == MET
    for name in (names.PEAK_RSS, names.PEAK_RSS_SAME, names.PEAK_RSS_DEFAULT):  # one round of processes
        assert figures[name]["pairs"] == 1 and 0.5 < figures[name]["value"] < 4
    assert family["memory"]["sessions"]["bare, ONNX Runtime's default session"] == "default"
    assert 0 < family["engine_bytes"]["bare"] < family["engine_bytes"]["production"] < family["engine_bytes"]["keyed"]
    noise = results["noise"]["resnet"]
    assert noise["shape"] == family["logits_shape"] and noise["latency"]["RandomNormalLike"]["median_ms"] > 0
    subgraph = {f"{names.SUBGRAPH} ({method})" for method in ("box-muller", "normal", "keyed")}
    assert subgraph == set(noise["figures"]) and all(noise["figures"][n]["pairs"] == 50 for n in subgraph)
    assert all(
        noise["figures"][n]["low"] <= noise["figures"][n]["value"] <= noise["figures"][n]["high"] for n in subgraph
    )
    table = lines[-2]
    for name in [*latency, *subgraph, names.ENGINE_BYTES, names.PEAK_RSS, names.PEAK_RSS_SAME]:
        assert name in table
    assert "95% interval" in table and "too few pairs" in table and UNRESOLVED in table
    # Nothing of the work folders is left behind but the JSON.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.quick.json"]


def test_rounds_interleave_in_turn_and_settle_after_pytorch(monkeypatch):
    calls, pauses = [], []
    monkeypatch.setattr("aim.benchmarks.timing.time.sleep", pauses.append)
    rounds = Rounds(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        warmup=1,
        settle=("a",),
        before_round=lambda i: calls.append(i),
    )
    rounds.run(3)
    # Round-robin, warm-up included, each round starting one variant further.
    assert calls == [-1, "b", "a", 0, "a", "b", 1, "b", "a", 2, "a", "b"]
    assert len(pauses) == 4 and rounds.count == 3 and len(rounds.times()["b"]) == 3
