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
        help="load-test the modulated model beside the bare one, tiered beside untiered, on Triton",
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
        help=f"concurrent clients, comma-separated (default: {','.join(map(str, CONCURRENCY))})",
    )
    p.add_argument("--protocol", action="append", choices=PROTOCOLS, help="grpc or http (repeatable; default: both)")
    p.add_argument(
        "--requests",
        type=shared.positive_int,
        help=f"measured requests per run at most (default: {defaults.requests}; --text: 200 streams)",
    )
    p.add_argument(
        "--seconds",
        type=_seconds,
        help=f"time per run at most, warm-up included (default: {defaults.seconds:g}; --text: 10)",
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
    p.add_argument(
        "--text",
        action="store_true",
        help="a text-generation build's MODEL-text instead: streams per second and time to first token "
        "(default concurrency 1,4,8)",
    )
    p.add_argument(
        "--max-tokens", type=shared.positive_int, default=16, help="--text: new tokens per stream (default: 16)"
    )
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.serving.loadtest import CONCURRENCY, Settings, cpu_table, run_loadtest, table

    if args.text:
        return run_text(args)
    settings = Settings(
        protocols=tuple(args.protocol or Settings().protocols),
        concurrency=args.concurrency or CONCURRENCY,
        requests=args.requests or Settings().requests,
        seconds=args.seconds or Settings().seconds,
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


def run_text(args) -> int:
    from aim.serving.textload import CONCURRENCY, REQUESTS, SECONDS, run_textload, text_table

    results = run_textload(
        args.build,
        args.out,
        args.concurrency or CONCURRENCY,
        args.requests or REQUESTS,
        args.seconds or SECONDS,
        args.max_tokens,
        args.instances,
    )
    print(text_table(results))
    print(f"wrote {args.out}/textload.json (server log: {args.out}/tritonserver-text.log)")
    return 0 if results["correct"] else 1
