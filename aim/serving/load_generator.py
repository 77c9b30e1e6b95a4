"""A closed-loop load: `concurrency` clients, each sending its next request as soon as its reply is
back, bounded in count and in time; throughput and latency measured in the steady state.

Triton's perf_analyzer measures the same loop but cannot look inside the replies; here every reply
is handed to a check (the load test's: bit-exact at utility 0, focus on the right class), so the
loop is written out: one thread per client (the Triton clients release the GIL while waiting).

The measurement window opens when the warm-up requests have been answered (or a quarter of the time
budget has passed, for a model so slow that the warm-up would eat the budget) and closes when the
first client finds the budget spent (after that the load drains and would no longer be
`concurrency`): throughput = replies inside the window / its length; latencies are those of the
requests sent inside it.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from aim.errors import AimError

JOIN_MARGIN_S = 60.0  # beyond the time budget, how long a client may take to return before it is a hang
WARMUP_SHARE = 0.25  # the warm-up ends after this share of the time budget at the latest


class LoadError(AimError):
    pass


@dataclass(frozen=True)
class Budget:
    concurrency: int
    requests: int  # measured requests at most (warm-up not counted)
    seconds: float  # wall time at most, warm-up included
    warmup: int  # requests answered before the window opens (or WARMUP_SHARE of the time, if sooner)


@dataclass
class Run:
    concurrency: int
    window_s: float
    replies_in_window: int
    latencies_s: np.ndarray  # of the requests sent inside the window
    sent: int  # every request, warm-up included
    outcomes: Counter  # what the checks said, every reply: {(kind, ok): count}
    errors: Counter  # server errors by message, every request
    seconds: float  # the whole run, warm-up and drain included
    cpu_s: dict[str, float] = field(
        default_factory=dict
    )  # CPU seconds of the whole run by side (server, client), where known

    @property
    def throughput(self) -> float:
        return self.replies_in_window / self.window_s

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_s, percentile) * 1e3)


@dataclass
class _Client:
    """One client's record: (sent, answered) per request, its outcomes and errors."""

    times: list = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)


def drive(
    open_client: Callable[[], object],
    send: Callable[[object, int], tuple[str, bool]],
    budget: Budget,
    server_error: type[BaseException],
    close_client: Callable[[object], None] = lambda client: None,
) -> Run:
    """Runs the loop. `open_client()` makes one client (in its own thread); `send(client, index)` sends
    request `index` and returns the check's (kind, ok); `server_error` is the client library's
    exception for a refused request (counted, not raised). Any other exception ends the run."""
    counter = itertools.count()
    total = budget.warmup + budget.requests
    begun = time.perf_counter()
    deadline = begun + budget.seconds
    clients = [_Client() for _ in range(budget.concurrency)]
    stops, failures = [], []

    def loop(record: _Client) -> None:
        try:
            client = open_client()
        except BaseException as error:  # noqa: BLE001 - reported by drive
            failures.append(error)
            return
        try:
            while True:
                index, sent = next(counter), time.perf_counter()
                if index >= total or sent >= deadline:
                    stops.append(sent)
                    return
                try:
                    kind, ok = send(client, index)
                    record.outcomes[kind, ok] += 1
                except server_error as error:
                    record.errors[str(error)[:300]] += 1
                record.times.append((sent, time.perf_counter()))
        except BaseException as error:  # noqa: BLE001 - a failing check or a bug: reported by drive
            failures.append(error)
        finally:
            close_client(client)

    threads = [threading.Thread(target=loop, args=(record,), daemon=True) for record in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline + JOIN_MARGIN_S - time.perf_counter()))
    if failures:
        raise failures[0]
    if any(thread.is_alive() for thread in threads):
        raise LoadError(f"a client got no reply within {budget.seconds + JOIN_MARGIN_S:.0f} s: the server hangs")
    return _summarise(clients, budget, begun, min(stops))


def _summarise(clients: list[_Client], budget: Budget, begun: float, closed: float) -> Run:
    times = np.array([entry for record in clients for entry in record.times], dtype=float).reshape(-1, 2)
    answered = np.sort(times[:, 1])
    warmed = begun if budget.warmup == 0 else answered[budget.warmup - 1] if len(answered) >= budget.warmup else np.inf
    opened = min(warmed, begun + WARMUP_SHARE * budget.seconds)
    in_window = int(np.sum((answered > opened) & (answered <= closed)))
    measured = times[(times[:, 0] >= opened) & (times[:, 0] <= closed)]
    if closed <= opened or in_window == 0 or len(measured) == 0:
        raise LoadError(
            f"no request was sent and answered after the warm-up within the {budget.seconds:g} s budget "
            f"({len(answered)} replies in all): give the load more time"
        )
    return Run(
        concurrency=budget.concurrency,
        window_s=float(closed - opened),
        replies_in_window=in_window,
        latencies_s=measured[:, 1] - measured[:, 0],
        sent=len(times),
        outcomes=sum((record.outcomes for record in clients), Counter()),
        errors=sum((record.errors for record in clients), Counter()),
        seconds=time.perf_counter() - begun,
    )
