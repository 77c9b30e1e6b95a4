"""`aim loadtest` on the real server, small: the sweep's JSON and PNG, every reply judged, and a wrong
reply failing the run. (The full sweep is `make loadtest`, a benchmark, not a test.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

import aim.cli as cli
import aim.serving.loadtest as loadtest
from aim.serving.loadtest import Settings, run_loadtest
from aim.serving.workloads import WORKLOADS
from tests.serving.conftest import _server_can_run

SMALL = dict(concurrency=(1, 4), requests=30, seconds=10.0, rounds=1, instances=1)


@pytest.fixture(autouse=True)
def _server_runs_here():
    reason = _server_can_run()
    if reason:
        pytest.skip(reason)


def test_a_small_sweep_writes_json_and_png_and_judges_every_reply(build_folder, tmp_path):
    out = tmp_path / "loadtest"
    results = run_loadtest(build_folder("resnet"), out, Settings(**SMALL), log=lambda line: None)
    assert json.loads((out / "loadtest.json").read_text()) == json.loads(json.dumps(results))
    assert (out / "loadtest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["correct"] and results["failures"] == [] and results["server"]["log_tracebacks"] == 0
    assert (
        results["server"]["models"] == {"modulated": "resnet", "bare": "resnet-bare", "tiered": "resnet-tiered"}
        and results["server"]["host"] == "127.0.0.1"
    )
    tiers = json.loads((out / "tiers.json").read_text())  # the premium key's digest, never the key
    assert list(tiers["keys"].values()) == ["premium"] and all(k.startswith("sha256:") for k in tiers["keys"])
    points = {(p["protocol"], p["concurrency"], p["workload"]): p for p in results["points"]}
    assert sorted(points) == sorted((p, c, w) for p in ("grpc", "http") for c in (1, 4) for w in WORKLOADS)
    for (_protocol, concurrency, name), point in points.items():
        warmup = max(2 * concurrency, 20)
        assert point["sent"] == warmup + 30 and point["errors"] == 0  # bounded by the request count
        checked = sum(c["checked"] for c in point["checks"].values())
        assert checked == point["sent"] and all(c["right"] == c["checked"] for c in point["checks"].values())
        assert point["throughput"] > 0 and 0 < point["p50_ms"] <= point["p99_ms"]
        kinds = {"bare": {"exact"}, "utility0": {"exact"}, "mixed": {"exact", "focus", "noisy"}}.get(
            name, {"exact", "focus", "noisy"}
        )
        assert set(point["checks"]) == kinds, (name, point["checks"])
    assert [(r["protocol"], r["concurrency"]) for r in results["ratios"]] == [
        ("grpc", 1),
        ("grpc", 4),
        ("http", 1),
        ("http", 4),
    ]
    assert all(r["utility0"] > 0 and r["mixed"] > 0 and r["tiered"] > 0 for r in results["ratios"])
    assert set(results["targets"]) == {"utility0", "mixed", "tiered"}
    assert results["targets"]["tiered"]["worst"] is None  # judged at 32 clients, which this sweep has not
    points = {(p["protocol"], p["workload"]): p for p in results["points"] if p["concurrency"] == 4}
    for protocol in ("grpc", "http"):  # the same requests through the tiered model: the same kinds, as many
        assert points[protocol, "tiered"]["checks"] == points[protocol, "mixed"]["checks"]


def test_a_reply_that_is_not_exact_fails_the_run(build_folder, tmp_path, monkeypatch, capsys):
    """The checks are wired end to end: with the expected bare logits off by one ulp, every exact
    reply is judged wrong, and `aim loadtest` exits 1 saying which."""
    bare_logits = loadtest.bare_logits

    def nudged(manifest, feeds):
        return [np.nextafter(logits, np.float32(np.inf)) for logits in bare_logits(manifest, feeds)]

    monkeypatch.setattr(loadtest, "bare_logits", nudged)
    out = tmp_path / "loadtest"
    code = cli.main(
        [
            "loadtest",
            str(build_folder("resnet")),
            "--out",
            str(out),
            "--concurrency",
            "2",
            "--protocol",
            "grpc",
            "--requests",
            "10",
            "--rounds",
            "1",
            "--instances",
            "1",
        ]
    )
    text = capsys.readouterr().out
    assert code == 1 and "load test FAILED" in text and "exact replies wrong" in text, text
    results = json.loads((out / "loadtest.json").read_text())
    assert not results["correct"]
    assert {p["workload"] for p in results["points"] if p["checks"]["exact"]["right"] == 0} == set(WORKLOADS)


def test_bad_arguments_end_with_one_error_line(tmp_path, capsys):
    assert cli.main(["loadtest", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        cli.main(["loadtest", str(tmp_path), "--concurrency", "8,0"])
    assert "every value must be at least 1" in capsys.readouterr().err


def test_the_text_sweep_measures_streams_and_time_to_first_token(build_folder, tmp_path, capsys):
    """`aim loadtest build/llama --text`: every stream read to its end, none failing; the first event
    comes before the stream's end."""
    out = tmp_path / "text"
    flags = ["--text", "--concurrency", "2", "--requests", "4", "--max-tokens", "4", "--instances", "1"]
    code = cli.main(["loadtest", str(build_folder("llama")), "--out", str(out), *flags])
    log = out / "tritonserver-text.log"
    assert code == 0, capsys.readouterr().err + (log.read_text()[-4000:] if log.is_file() else "")
    assert "| clients | streams / s |" in capsys.readouterr().out
    results = json.loads((out / "textload.json").read_text())
    (point,) = results["points"]
    assert results["correct"] and point["errors"] == 0 and point["streams"] == 2 + 4  # warm-up, then 4 measured
    assert 0 < point["ttft_p50_ms"] <= point["stream_p50_ms"] and point["pieces_per_s"] >= point["streams_per_s"]
    assert cli.main(["loadtest", str(build_folder("resnet")), "--out", str(out), "--text"]) == 2
    assert "no text-generation build" in capsys.readouterr().err
