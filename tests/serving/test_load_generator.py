"""The load test's parts without a server: the closed loop (load.py) against a fake server whose
timing is known, and the judge of replies (workloads.py) against replies broken on purpose."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from aim.serving.load_generator import Budget, LoadError, drive
from aim.serving.workloads import EXACT_SHARE, FOCUS_SHARE, Request, judge, workload


class Refused(Exception):
    """The fake client library's error for a refused request."""


class FakeServer:
    """Answers after `delay` seconds; counts requests in flight, remembers the most."""

    def __init__(self, delay: float, refuse_every: int = 0):
        self.delay, self.refuse_every = delay, refuse_every
        self.lock, self.in_flight, self.most, self.indices = threading.Lock(), 0, 0, []

    def send(self, client, index):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.indices.append(index)
        time.sleep(self.delay)
        with self.lock:
            self.in_flight -= 1
        if self.refuse_every and index % self.refuse_every == 0:
            raise Refused("model is not ready")
        return ("exact", index % 2 == 0)


def test_the_loop_keeps_concurrency_requests_in_flight_and_measures_their_rate():
    """A server that answers in 10 ms, 8 clients: 800 replies/s in the steady state, latency 10 ms."""
    server = FakeServer(0.010)
    run = drive(lambda: object(), server.send, Budget(concurrency=8, requests=240, seconds=30, warmup=16), Refused)
    assert server.most == 8  # never more, and it did get there
    assert sorted(server.indices) == list(range(256))  # every index once: warm-up + requests, no more
    assert run.sent == 256 and 240 - 8 <= len(run.latencies_s) <= 240  # sent after the 16th reply
    assert 600 < run.throughput <= 800 * 1.05, run.throughput  # sleep overshoots, never undershoots
    assert 9.5 < run.latency_ms(50) < 20
    assert run.outcomes == {("exact", True): 128, ("exact", False): 128}
    assert not run.errors


def test_the_time_budget_stops_the_loop():
    """A budget of 10,000 requests at 50 ms each would take 250 s at concurrency 2; 0.5 s stops it."""
    server = FakeServer(0.050)
    started = time.perf_counter()
    run = drive(lambda: object(), server.send, Budget(concurrency=2, requests=10_000, seconds=0.5, warmup=2), Refused)
    assert time.perf_counter() - started < 0.5 + 0.2
    assert run.sent <= 2 * (0.5 / 0.050 + 1)


def test_refused_requests_are_counted_and_other_exceptions_end_the_run():
    server = FakeServer(0.001, refuse_every=5)
    run = drive(lambda: object(), server.send, Budget(concurrency=3, requests=100, seconds=30, warmup=0), Refused)
    assert run.errors == {"model is not ready": 20} and sum(run.outcomes.values()) == 80

    def broken(client, index):
        raise KeyError("a bug in a check")

    with pytest.raises(KeyError, match="a bug in a check"):
        drive(lambda: object(), broken, Budget(concurrency=3, requests=10, seconds=30, warmup=0), Refused)


def test_a_slow_model_gets_a_shorter_warm_up_and_one_slower_than_the_budget_an_error():
    """The warm-up ends after a quarter of the time budget at the latest: 20 warm-up requests at 50 ms
    would take 1 s of a 1.2 s budget. A request slower than the whole budget is an error that says so."""
    run = drive(
        lambda: object(), FakeServer(0.050).send, Budget(concurrency=1, requests=100, seconds=1.2, warmup=20), Refused
    )
    assert 0.85 < run.window_s < 1.0 and 15 <= run.replies_in_window <= 19
    with pytest.raises(LoadError, match="give the load more time"):
        drive(
            lambda: object(), FakeServer(0.300).send, Budget(concurrency=1, requests=10, seconds=0.2, warmup=5), Refused
        )


BARE = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)


def _one_ulp_off():
    reply = BARE.copy()
    reply[0, 2] = np.nextafter(reply[0, 2], np.float32(9))
    return reply


def _reply(kind, cls=-1, sign=0.0):
    return Request({}, kind, BARE, cls, sign)


@pytest.mark.parametrize(
    "request_, reply, right",
    [
        (_reply("exact"), BARE.copy(), True),
        (_reply("exact"), _one_ulp_off(), False),
        (_reply("exact"), BARE.astype(np.float64), False),  # the right values in the wrong type
        (_reply("exact"), BARE[:, :3], False),
        (_reply("focus", 1, 1.0), BARE + np.array([[0, 0.3, 0, 0]], np.float32), True),
        (_reply("focus", 1, -1.0), BARE - np.array([[0, 0.3, 0, 0]], np.float32), True),
        (_reply("focus", 1, 1.0), BARE - np.array([[0, 0.3, 0, 0]], np.float32), False),  # suppressed, not boosted
        (_reply("focus", 1, 1.0), BARE + np.array([[0, 0.3, 0.1, 0]], np.float32), False),  # another class moved
        (_reply("focus", 1, 1.0), BARE.copy(), False),  # the focus did nothing
        (_reply("noisy"), BARE + 0.5, True),
        (_reply("noisy"), BARE.copy(), False),  # no noise at utility > 0
        (_reply("noisy"), BARE + np.array([[0, np.nan, 0, 0]], np.float32), False),
    ],
)
def test_the_judge_tells_a_right_reply_from_a_wrong_one(request_, reply, right):
    assert judge(request_, reply, class_axis=1) is right


def test_the_mixed_workload_has_its_stated_shares_and_knobs():
    feeds = [{"x": np.zeros((1, 2), np.float32)}] * 4
    requests = workload("mixed", feeds, [BARE] * 4, num_classes=4, count=3000)
    kinds = [r.kind for r in requests]
    # binomial, n = 3000: 5 standard deviations is at most 0.046
    assert (
        abs(kinds.count("exact") / 3000 - EXACT_SHARE) < 0.046 and abs(kinds.count("focus") / 3000 - FOCUS_SHARE) < 0.03
    )
    for r in requests:
        utility, focus = r.inputs["utility"], r.inputs["focus"]
        assert utility.shape == (1, 1) and focus.shape == (1, 4)
        assert (utility[0, 0] == 0) == (r.kind != "noisy") and (np.count_nonzero(focus) == 1) == (r.kind == "focus")
        if r.kind == "focus":
            assert np.sign(focus[0, r.focus_class]) == r.focus_sign
        if r.kind == "noisy":
            assert 0.5 <= utility[0, 0] <= 5
    assert all(
        r.kind == "exact" and not np.any(r.inputs["utility"]) for r in workload("utility0", feeds, [BARE] * 4, 4)
    )
    assert all(set(r.inputs) == {"x"} for r in workload("bare", feeds, [BARE] * 4, 4))
