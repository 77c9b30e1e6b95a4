"""The benchmark's machinery on a tiny model: figures, checks and JSON (no timing is asserted)."""

import json
import math

from aim.benchmarks.run import TARGETS, run
from aim.benchmarks.timing import measure, ratio


def test_quick_bench_writes_every_figure_and_its_engines_pass_the_checks(tmp_path):
    lines = []
    results = run(["resnet"], tmp_path, quick=True, make_engine=False, log=lines.append)
    saved = json.loads((tmp_path / "bench.quick.json").read_text())
    assert saved["families"].keys() == {"resnet"} and saved["onnxruntime"]["intra_op_num_threads"] == 2
    family = results["families"]["resnet"]
    # The benchmarked modulated engine is still exact at utility 0 and statistically right.
    assert family["checks_passed"] and len(family["checks"]) >= 7
    assert family["keyed_checks_passed"] and len(family["keyed_checks"]) == 11  # and so is the keyed engine
    assert set(family["targets"]) == {k for k in TARGETS if k != "P2"}
    for target in family["targets"].values():
        assert math.isfinite(target["value"]) and target["value"] > 0
    # The subgraph adds little to the engine file (the target is < 1 MB).
    assert family["targets"]["engine bytes added"]["met"] and family["targets"]["engine bytes added (keyed)"]["met"]
    assert 0 < family["engine_bytes"]["bare"] < family["engine_bytes"]["production"] < family["engine_bytes"]["keyed"]
    noise = results["noise"]["resnet"]
    assert noise["shape"] == family["logits_shape"] and noise["latency"]["RandomNormalLike"]["median_ms"] > 0
    assert {"P2 (box-muller)", "P2 (normal)", "P2 (keyed)"} <= set(noise)
    table = lines[-2]
    assert all(
        key in table
        for key in (
            "P1a",
            "P1b",
            "P1a keyed",
            "P1b keyed",
            "P2",
            "P2 (keyed)",
            "P3 utility 0",
            "engine bytes added (keyed)",
        )
    )
    # Nothing of the work folders is left behind but the JSON.
    assert [p.name for p in tmp_path.iterdir()] == ["bench.quick.json"]


def test_timing_interleaves_and_ratios_use_medians():
    calls = []
    stats = measure({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # round-robin, warm-up included
    assert stats["a"]["n"] == 3
    r = ratio({"median_ms": 3.0, "q1_ms": 2.0, "q3_ms": 4.0}, {"median_ms": 2.0, "q1_ms": 1.0, "q3_ms": 4.0})
    assert r == {"ratio": 1.5, "low": 0.5, "high": 4.0}
