"""`make loadtest MODEL=x`: what modulation costs a served model, measured on the real Triton server.

Two repositories of the same build, written by `aim triton` and configured alike (instances,
threads, dynamic batching): the modulated engine as <model> and the bare model as <model>-bare; and
a tiered one (a repository is tiered as a whole) with <model>-tiered, whose tiers file (in the out
folder, the key's digest only) has a premium tier and a default one. One server (TritonServer, what
`aim serve` runs) on both, on 127.0.0.1 only, free ports. Then, for each protocol (gRPC, HTTP;
Triton's own clients) and each concurrency (1, 8, 32, 128), the four workloads of workloads.py run in
turn, `rounds` times in a rotating order, so that a slow spell of a
shared machine falls on all three alike. Each run is a closed loop (load.py) bounded by a request
count and a time budget. Every reply is judged; every point records errors, the judged replies,
throughput and p50 / p99 latency. Written: build/loadtest/loadtest.json, loadtest.png, and the
server's log (tritonserver.log), which must hold no traceback.

Throughput ratios (modulated / bare, tiered / mixed) are benchmark figures, not pass/fail: TARGETS
states them and the JSON says which are met. A wrong reply or a server error fails the run (exit code 1).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aim.errors import AimError
from aim.files import atomic_path
from aim.serving.cputime import tree_cpu_s
from aim.serving.load_generator import Budget, Run, drive
from aim.serving.triton import BARE_SUFFIX, MAX_QUEUE_DELAY_US, write_model
from aim.serving.workloads import DEFAULT_SIGMA, WORKLOADS, Request, bare_logits, judge, samples, workload

PROTOCOLS = ("grpc", "http")
CONCURRENCY = (1, 8, 32, 128)
# Served throughput of a workload / its baseline's, at least `bound`: at every concurrency and protocol,
# or at the one concurrency given.
TARGETS = {"utility0": ("bare", 0.97, None), "mixed": ("bare", 0.90, None), "tiered": ("mixed", 0.97, 32)}
TIERED_SUFFIX = "-tiered"
REQUEST_TIMEOUT_S = 30.0  # one request; a hang beyond it is an error, not a stall of the run
LOOPBACK = "127.0.0.1"


class LoadTestError(AimError):
    pass


@dataclass
class Settings:
    protocols: tuple[str, ...] = PROTOCOLS
    concurrency: tuple[int, ...] = CONCURRENCY
    requests: int = 4000  # measured requests per run at most
    seconds: float = 2.0  # per run at most, warm-up included
    rounds: int = 4  # runs per workload and point, in rotating order
    instances: int | None = None  # per model; None: aim triton's default (the cores)
    threads: int | None = None
    max_queue_delay_us: int = MAX_QUEUE_DELAY_US
    seed: int = 0

    def warmup(self, concurrency: int) -> int:
        return max(2 * concurrency, 20)

    def check(self) -> None:
        unknown = sorted(set(self.protocols) - set(PROTOCOLS))
        if unknown or not self.protocols:
            raise LoadTestError(f"protocols {list(self.protocols)}: choose from {', '.join(PROTOCOLS)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise LoadTestError(f"concurrency {list(self.concurrency)}: every value must be at least 1")
        if self.requests < 1 or self.seconds <= 0 or self.rounds < 1:
            raise LoadTestError(
                f"requests {self.requests}, seconds {self.seconds:g}, rounds {self.rounds}: each must be positive"
            )


@dataclass
class Point:
    """One (protocol, concurrency, workload): its runs pooled."""

    protocol: str
    concurrency: int
    workload: str
    model: str
    runs: list[Run] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        latencies = np.concatenate([run.latencies_s for run in self.runs])
        replies, window = sum(r.replies_in_window for r in self.runs), sum(r.window_s for r in self.runs)
        outcomes = sum((run.outcomes for run in self.runs), Counter())
        errors = sum((run.errors for run in self.runs), Counter())
        checks = {}
        for (kind, ok), count in outcomes.items():
            entry = checks.setdefault(kind, {"checked": 0, "right": 0})
            entry["checked"] += count
            entry["right"] += count if ok else 0
        sent = sum(run.sent for run in self.runs)
        cpu = (
            {side: sum(run.cpu_s[side] for run in self.runs) / sent * 1e3 for side in ("server", "client")}
            if all(r.cpu_s for r in self.runs)
            else None
        )
        return {
            "protocol": self.protocol,
            "concurrency": self.concurrency,
            "workload": self.workload,
            "model": self.model,
            "throughput": replies / window,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            "sent": sent,
            "cpu_ms_per_request": cpu,  # the server's processes (stubs included) and this client, warm-up included
            "errors": sum(errors.values()),
            "error_messages": [message for message, _ in errors.most_common(3)],
            "checks": dict(sorted(checks.items())),
            "rounds": [
                {"throughput": run.throughput, "window_s": run.window_s, "replies": run.replies_in_window}
                for run in self.runs
            ],
        }


def _prepared(requests: list[Request], protocol: str, output: str) -> list[tuple[Request, list, list, dict]]:
    """(request, InferInputs, requested outputs, headers) built once: the clients only send them."""
    from tritonclient.utils import np_to_triton_dtype

    module = _client_module(protocol)
    prepared = []
    for request in requests:
        tensors = []
        for name, array in request.inputs.items():
            tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        headers = {"authorization": f"Bearer {request.key}"} if request.key else None
        prepared.append((request, tensors, [module.InferRequestedOutput(output)], headers))
    return prepared


def _client_module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _one_run(server, protocol: str, model: str, prepared: list, class_axis: int, output: str, budget: Budget) -> Run:
    from tritonclient.utils import InferenceServerException

    module = _client_module(protocol)
    if protocol == "grpc":

        def open_client():
            return module.InferenceServerClient(server.grpc_url)

        def infer(client, tensors, outputs, headers):
            return client.infer(model, tensors, outputs=outputs, headers=headers, client_timeout=REQUEST_TIMEOUT_S)
    else:

        def open_client():
            return module.InferenceServerClient(
                server.http_url, connection_timeout=REQUEST_TIMEOUT_S, network_timeout=REQUEST_TIMEOUT_S
            )

        def infer(client, tensors, outputs, headers):
            return client.infer(model, tensors, outputs=outputs, headers=headers)

    def send(client, index: int) -> tuple[str, bool]:
        request, tensors, outputs, headers = prepared[index % len(prepared)]
        return request.kind, judge(request, infer(client, tensors, outputs, headers).as_numpy(output), class_axis)

    server_cpu, client_cpu = tree_cpu_s(server.process.pid), time.process_time()
    run = drive(open_client, send, budget, InferenceServerException, close_client=lambda client: client.close())
    if server_cpu is not None:
        run.cpu_s = {"server": tree_cpu_s(server.process.pid) - server_cpu, "client": time.process_time() - client_cpu}
    return run


def _failures(summary: dict) -> list[str]:
    """What went wrong at one point: server errors, wrong replies."""
    where = f"{summary['protocol']} x{summary['concurrency']} {summary['workload']}"
    found = (
        [f"{where}: {summary['errors']} errors ({'; '.join(summary['error_messages'])})"] if summary["errors"] else []
    )
    for kind, count in summary["checks"].items():
        if count["right"] < count["checked"]:
            found.append(f"{where}: {count['checked'] - count['right']} of {count['checked']} {kind} replies wrong")
    return found


def _ratios(points: dict[tuple, Point]) -> list[dict]:
    """Throughput of each target's workload / its baseline's per point: the median over rounds of each
    round's ratio (a round runs the workloads back to back, so a slow spell of the machine falls on
    both sides of a ratio). `<workload>_by_server_cpu`: the server's CPU time per request, baseline /
    workload: the throughput ratio of a server that has the CPU to itself, far less moved by a busy
    machine."""
    rows = []
    for protocol, concurrency in dict.fromkeys((p, c) for p, c, _ in points):
        row = {"protocol": protocol, "concurrency": concurrency}
        for name, (baseline, _, _) in TARGETS.items():
            base, served = points[protocol, concurrency, baseline], points[protocol, concurrency, name]
            per_round = [run.throughput / other.throughput for run, other in zip(served.runs, base.runs)]
            row[name], row[f"{name}_rounds"] = float(np.median(per_round)), per_round
            cpu = [point.summary()["cpu_ms_per_request"] for point in (base, served)]
            row[f"{name}_by_server_cpu"] = cpu[0]["server"] / cpu[1]["server"] if all(cpu) else None
        rows.append(row)
    return rows


def _judge_targets(ratios: list[dict]) -> dict:
    judged = {}
    for name, (baseline, bound, concurrency) in TARGETS.items():
        rows = [row for row in ratios if concurrency is None or row["concurrency"] == concurrency]
        where = "at every point" if concurrency is None else f"at {concurrency} clients"
        worst = min((row[name] for row in rows), default=None)
        judged[name] = {
            "target": f"{name} / {baseline} >= {bound:g} {where}",
            "worst": worst,
            "met": worst is not None and worst >= bound,
        }
    return judged


def _config_summary(repository: Path, model: str) -> dict:
    from aim.serving.triton import THREADS_PARAMETER, read_config

    config = read_config(repository / model)
    threads = config.parameters[THREADS_PARAMETER].string_value if THREADS_PARAMETER in config.parameters else None
    return {
        "instances": sum(group.count for group in config.instance_group),
        "threads_per_instance": int(threads) if threads else None,
        "max_batch_size": config.max_batch_size,
        "max_queue_delay_us": config.dynamic_batching.max_queue_delay_microseconds,
    }


def _repository(build_folder, manifest, out: Path, settings: Settings) -> tuple[list[Path], dict[str, str], str]:
    """<out>/repository (the modulated and the bare model) and <out>/repository-tiered (the tiered
    one, its tiers file <out>/tiers.json), configured alike; their names, and the premium key (held
    here only: the files keep its digest)."""
    from aim.serving.tiers import key_digest, new_key

    repositories = [out / "repository", out / "repository-tiered"]
    names = {
        "modulated": manifest.model,
        "bare": manifest.model + BARE_SUFFIX,
        "tiered": manifest.model + TIERED_SUFFIX,
    }
    key = new_key()
    tiers = out / "tiers.json"
    table = {
        "default": "default",
        "tiers": {"default": {"utility": DEFAULT_SIGMA}, "premium": {"utility": 0.0}},
        "keys": {key_digest(key): "premium"},
    }
    with atomic_path(tiers) as tmp:
        tmp.write_text(json.dumps(table, indent=2) + "\n")
    for role, name in names.items():
        write_model(
            build_folder,
            repositories[role == "tiered"],
            name,
            None,
            settings.max_queue_delay_us,
            settings.instances,
            settings.threads,
            bare=role == "bare",
            tiers=tiers if role == "tiered" else None,
        )
    return repositories, names, key


def _sweep(server, manifest, names: dict[str, str], key: str, settings: Settings, log) -> dict[tuple, Point]:
    """Every (protocol, concurrency, workload) point, the workloads in rotating order per round."""
    output, class_axis = manifest.modulation.logits, manifest.modulation.class_axis
    feeds = samples(manifest, settings.seed)
    bare = bare_logits(manifest, feeds)
    classes = manifest.modulation.num_classes
    requests = {name: workload(name, feeds, bare, classes, settings.seed, premium_key=key) for name in WORKLOADS}
    served = {name: names[{"bare": "bare", "tiered": "tiered"}.get(name, "modulated")] for name in WORKLOADS}
    points: dict[tuple, Point] = {}
    for protocol in settings.protocols:
        prepared = {name: _prepared(requests[name], protocol, output) for name in WORKLOADS}
        for concurrency in settings.concurrency:
            budget = Budget(concurrency, settings.requests, settings.seconds, settings.warmup(concurrency))
            for round_index in range(settings.rounds):
                shift = round_index % len(WORKLOADS)
                for name in WORKLOADS[shift:] + WORKLOADS[:shift]:
                    point = points.setdefault(
                        (protocol, concurrency, name), Point(protocol, concurrency, name, served[name])
                    )
                    point.runs.append(
                        _one_run(server, protocol, served[name], prepared[name], class_axis, output, budget)
                    )
            row = {name: points[protocol, concurrency, name].summary() for name in WORKLOADS}
            log(
                f"  {protocol:4} x{concurrency:<4} "
                + "  ".join(
                    f"{name} {row[name]['throughput']:7.0f}/s p99 {row[name]['p99_ms']:6.1f} ms" for name in WORKLOADS
                )
            )
    return points


def run_loadtest(
    build_folder: str | os.PathLike,
    out: str | os.PathLike,
    settings: Settings | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The sweep (module docstring); returns what it writes to <out>/loadtest.json."""
    from aim.runtime.folder import Build
    from aim.serving.loadplot import plot
    from aim.serving.server import TritonServer

    settings = settings or Settings()
    settings.check()
    manifest = Build.open(build_folder).manifest
    if manifest.backend != "onnxruntime":
        raise LoadTestError(
            f"{build_folder} has a {manifest.backend} engine; the server here (nvidia-pytriton's) runs ONNX "
            "Runtime engines only. "
            f"Load-test an ONNX Runtime build (BACKEND=onnxruntime), or a TensorRT one on a full Triton with its GPU"
        )
    out = Path(out)
    repositories, names, key = _repository(build_folder, manifest, out, settings)
    log(
        f"load test of {manifest.model}: {len(settings.protocols)} protocols x concurrency "
        f"{list(settings.concurrency)} x "
        f"{len(WORKLOADS)} workloads x {settings.rounds} rounds, each at most {settings.requests} requests / "
        f"{settings.seconds:g} s"
    )
    started = time.monotonic()
    log_path = out / "tritonserver.log"
    with TritonServer(repositories, models=list(names.values()), host=LOOPBACK, log_path=log_path) as server:
        points = _sweep(server, manifest, names, key, settings, log)
        server_log = server.log()
    summaries = [point.summary() for point in points.values()]
    ratios = _ratios(points)
    failures = [failure for summary in summaries for failure in _failures(summary)]
    tracebacks = server_log.count("Traceback")
    if tracebacks:
        failures.append(f"the server log holds {tracebacks} tracebacks ({log_path})")
    results = {
        "model": manifest.model,
        "build": str(Path(build_folder).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count(), "python": platform.python_version()},
        "server": {
            "models": names,
            "host": LOOPBACK,
            **_config_summary(repositories[0], names["modulated"]),
            "log_tracebacks": tracebacks,
        },
        "settings": {
            **asdict(settings),
            "warmup": {c: settings.warmup(c) for c in settings.concurrency},
            "request_timeout_s": REQUEST_TIMEOUT_S,
        },
        "workloads": {
            "bare": "the bare model",
            "utility0": "utility 0, focus 0",
            "mixed": "1/3 utility 0, 1/10 focus-only, the rest utility 0.5-5",
            "tiered": f"mixed's requests through the tiered model: premium key, or none (sigma {DEFAULT_SIGMA:g})",
        },
        "points": summaries,
        "ratios": ratios,
        "targets": _judge_targets(ratios),
        "correct": not failures,
        "failures": failures,
        "seconds": time.monotonic() - started,
    }
    with atomic_path(out / "loadtest.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    plot(results, out / "loadtest.png")
    return results


def table(results: dict) -> str:
    """The docs' table: per protocol and concurrency, bare beside modulated, and tiered beside mixed."""
    by_key = {(p["protocol"], p["concurrency"], p["workload"]): p for p in results["points"]}
    lines = [
        "| protocol | clients | bare req/s | p50 / p99 ms | utility 0 req/s | / bare | mixed req/s | / bare | "
        "tiered req/s | / mixed | p50 / p99 ms | errors | exact | focus right |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["ratios"]:
        protocol, clients = row["protocol"], row["concurrency"]
        bare, zero, mixed, tiered = (by_key[protocol, clients, name] for name in WORKLOADS)
        exact = [p["checks"].get("exact", {"checked": 0, "right": 0}) for p in (zero, mixed, tiered)]
        focus = [p["checks"].get("focus", {"checked": 0, "right": 0}) for p in (mixed, tiered)]
        errors = sum(p["errors"] for p in (bare, zero, mixed, tiered))
        lines.append(
            f"| {protocol} | {clients} | {bare['throughput']:.0f} | {bare['p50_ms']:.1f} / {bare['p99_ms']:.1f} "
            f"| {zero['throughput']:.0f} | {row['utility0']:.3f} | {mixed['throughput']:.0f} | {row['mixed']:.3f} "
            f"| {tiered['throughput']:.0f} | {row['tiered']:.3f} | {tiered['p50_ms']:.1f} / {tiered['p99_ms']:.1f} "
            f"| {errors} | {sum(e['right'] for e in exact)}/{sum(e['checked'] for e in exact)} "
            f"| {sum(f['right'] for f in focus)}/{sum(f['checked'] for f in focus)} |"
        )
    return "\n".join(lines)


def cpu_table(results: dict) -> str:
    """Server CPU time per request (its processes, the Python backend's stubs included) per workload,
    and the ratios it implies for a server with the cores to itself."""
    by_key = {(p["protocol"], p["concurrency"], p["workload"]): p for p in results["points"]}
    lines = [
        "| protocol | clients | server CPU ms / request: bare | utility 0 | mixed | tiered | bare / utility 0 | "
        "bare / mixed | mixed / tiered | client CPU ms / request (bare) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["ratios"]:
        cpu = [by_key[row["protocol"], row["concurrency"], name]["cpu_ms_per_request"] for name in WORKLOADS]
        if not all(cpu):
            continue
        lines.append(
            f"| {row['protocol']} | {row['concurrency']} | "
            + " | ".join(f"{c['server']:.3f}" for c in cpu)
            + f" | {row['utility0_by_server_cpu']:.3f} | {row['mixed_by_server_cpu']:.3f} "
            f"| {row['tiered_by_server_cpu']:.3f} | {cpu[0]['client']:.3f} |"
        )
    return "\n".join(lines)
