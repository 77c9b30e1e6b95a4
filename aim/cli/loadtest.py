"""aim loadtest build/MODEL: the modulated and the bare model on the real Triton server, under load."""

from __future__ import annotations

import argparse

from aim.cli import args as shared


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every value must be at least 1, got {text!r}")
    return values


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add(sub) -> None:
    from aim.serving.loadtest import CONCURRENCY, PROTOCOLS, Settings

    defaults = Settings()
    p = sub.add_parser(
        "loadtest",
        help="load-test the modulated model beside the bare one (and the tiered one) on the real Triton server",
    )
    p.add_argument("build", help="a build folder with manifest.json, e.g. build/resnet (an ONNX Runtime engine)")
    p.add_argument(
        "--out",
        default="build/loadtest",
        help="where loadtest.json, loadtest.png and the server's log go (default: build/loadtest)",
    )
    p.add_argument(
        "--concurrency",
        type=_counts,
        default=CONCURRENCY,
        help=f"concurrent clients, comma-separated (default: {','.join(map(str, CONCURRENCY))})",
    )
    p.add_argument("--protocol", action="append", choices=PROTOCOLS, help="grpc or http (repeatable; default: both)")
    p.add_argument(
        "--requests",
        type=shared.positive_int,
        default=defaults.requests,
        help=f"measured requests per run at most (default: {defaults.requests})",
    )
    p.add_argument(
        "--seconds",
        type=_seconds,
        default=defaults.seconds,
        help=f"time per run at most, warm-up included (default: {defaults.seconds:g})",
    )
    p.add_argument(
        "--rounds",
        type=shared.positive_int,
        default=defaults.rounds,
        help=f"runs per workload and point, in rotating order (default: {defaults.rounds})",
    )
    p.add_argument(
        "--instances", type=shared.positive_int, help="model instances of each model (default: aim triton's)"
    )
    p.add_argument(
        "--threads", type=shared.positive_int, help="ONNX Runtime threads per instance (default: aim triton's)"
    )
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.serving.loadtest import Settings, cpu_table, run_loadtest, table

    settings = Settings(
        protocols=tuple(args.protocol or Settings().protocols),
        concurrency=args.concurrency,
        requests=args.requests,
        seconds=args.seconds,
        rounds=args.rounds,
        instances=args.instances,
        threads=args.threads,
        seed=args.seed,
    )
    results = run_loadtest(args.build, args.out, settings)
    print(table(results))
    print(cpu_table(results))
    for judged in results["targets"].values():
        worst = "n/a" if judged["worst"] is None else f"{judged['worst']:.3f}"
        print(f"target {judged['target']}: worst {worst}, {'met' if judged['met'] else 'MISSED'}")
    print(
        f"wrote {args.out}/loadtest.json and loadtest.png in {results['seconds']:.0f} s (server log: "
        f"{args.out}/tritonserver.log)"
    )
    if not results["correct"]:
        print("load test FAILED:\n  " + "\n  ".join(results["failures"]))
        return 1
    return 0
