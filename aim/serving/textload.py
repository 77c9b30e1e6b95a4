"""`aim loadtest build/llama --text`: streams per second and time to first token of `<model>-text`.

One repository with the build's text model (untiered, utility 0: the bare model's text), one server
on 127.0.0.1. For each concurrency, `concurrency` clients each open a stream (`/generate_stream`,
`"stream": true`), read it to its end and open the next, in a closed loop bounded in count and time
(load_generator.drive). Per stream: the time from sending the request to its first event (time to
first token) and whether it ended cleanly with at least one piece; per point: streams per second,
pieces (about tokens) per second, and TTFT's p50 and p99. Written: <out>/textload.json.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.files import atomic_path
from aim.serving.load_generator import Budget, LoadError, drive

CONCURRENCY = (1, 4, 8)
MAX_TOKENS = 16
PROMPTS = ("def main():", "The quick brown fox", "import numpy as np", "Once upon a time")
TIMEOUT_S = 120.0
REQUESTS, SECONDS = 200, 10.0  # streams per point at most, and its time at most


class StreamError(AimError):
    pass


def _stream(connection: http.client.HTTPConnection, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first event, events) of one stream, read to its end."""
    body = json.dumps({"text_input": prompt, "max_tokens": max_tokens, "utility": 0, "stream": True})
    sent = time.perf_counter()
    connection.request("POST", f"/v2/models/{model}/generate_stream", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    first, events = None, 0
    for line in response:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[len(b"data: ") :])
        if "error" in event:
            raise StreamError(event["error"])
        first = first if first is not None else time.perf_counter() - sent
        events += 1
    if response.status != 200 or first is None:
        raise StreamError(f"HTTP {response.status}, {events} events")
    return first, events


def run_textload(
    build_folder: str | os.PathLike,
    out: str | os.PathLike,
    concurrency=CONCURRENCY,
    requests: int = REQUESTS,
    seconds: float = SECONDS,
    max_tokens: int = MAX_TOKENS,
    instances: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    from aim.runtime.folder import Build
    from aim.serving.server import TritonServer
    from aim.serving.triton import TEXT_SUFFIX, write_model

    manifest = Build.open(build_folder).manifest
    if not manifest.tokenizer:
        raise AimError(f"{build_folder} is no text-generation build (no tokenizer): --text needs one, e.g. build/llama")
    out = Path(out)
    model = manifest.model + TEXT_SUFFIX
    write_model(build_folder, out / "repository-text", model, instances=instances, text=True)
    points = []
    log_path = out / "tritonserver-text.log"
    with TritonServer(out / "repository-text", host="127.0.0.1", log_path=log_path) as server:
        host, port = server.host, server.http_port
        for clients in concurrency:
            first_event, pieces = [], []  # first_event: (sent, answered, ttft) per stream

            def send(connection, index, first_event=first_event, pieces=pieces):
                sent = time.perf_counter()
                ttft, events = _stream(connection, model, PROMPTS[index % len(PROMPTS)], max_tokens)
                first_event.append((sent, time.perf_counter(), ttft))
                pieces.append(events)
                return "stream", True

            try:
                run = drive(
                    lambda: http.client.HTTPConnection(host, port, timeout=TIMEOUT_S),
                    send,
                    Budget(clients, requests, seconds, warmup=clients),
                    StreamError,
                    close_client=lambda connection: connection.close(),
                )
            except LoadError as error:
                raise LoadError(f"{error} (at {clients} clients; the server's log: {log_path})") from None
            # The streams sent after the warm-up's last answer, as drive() measures their latency: TTFT over
            # the same streams (the first `clients` to finish were not always the first sent).
            answered = sorted(end for _, end, _ in first_event)
            opened = answered[clients - 1] if len(answered) >= clients else -np.inf
            measured = np.array([t for sent, _, t in first_event if sent >= opened] or [t for *_, t in first_event])
            point = {
                "concurrency": clients,
                "streams_per_s": run.throughput,
                "pieces_per_s": run.throughput * float(np.mean(pieces)),
                "ttft_p50_ms": float(np.percentile(measured, 50) * 1e3),
                "ttft_p99_ms": float(np.percentile(measured, 99) * 1e3),
                "stream_p50_ms": run.latency_ms(50),
                "streams": run.sent,
                "errors": sum(run.errors.values()),
                "error_messages": [message for message, _ in run.errors.most_common(3)],
            }
            points.append(point)
            log(
                f"  x{clients:<3} {point['streams_per_s']:6.1f} streams/s  {point['pieces_per_s']:7.0f} pieces/s  "
                f"TTFT p50 {point['ttft_p50_ms']:6.1f} ms p99 {point['ttft_p99_ms']:6.1f} ms  errors {point['errors']}"
            )
    results = {
        "model": model,
        "build": str(Path(build_folder).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "max_tokens": max_tokens,
        "cores": os.cpu_count(),
        "points": points,
        "correct": all(point["errors"] == 0 for point in points),
    }
    with atomic_path(out / "textload.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    return results


def text_table(results: dict) -> str:
    lines = [
        "| clients | streams / s | pieces / s | TTFT p50 / p99 ms | stream p50 ms | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in results["points"]:
        lines.append(
            f"| {p['concurrency']} | {p['streams_per_s']:.1f} | {p['pieces_per_s']:.0f} | {p['ttft_p50_ms']:.1f} / "
            f"{p['ttft_p99_ms']:.1f} | {p['stream_p50_ms']:.0f} | {p['errors']} |"
        )
    return "\n".join(lines)
