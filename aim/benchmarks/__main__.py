"""python -m aim.benchmarks [--models resnet,segformer,llama,generation] [--out build/bench] [--quick]
[--no-make-engine] [--budget-s 120]"""

import argparse
import sys
from pathlib import Path

from aim.benchmarks.confidence import BUDGET, Budget
from aim.benchmarks.models import benchmarked
from aim.benchmarks.run import run
from aim.errors import AimError

GENERATION = "generation"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m aim.benchmarks", description=__doc__)
    everything = [*benchmarked(), GENERATION]
    parser.add_argument(
        "--models",
        default=",".join(everything),
        help=f"comma-separated, of {','.join(everything)} (generation: decoding against Optimum and transformers)",
    )
    parser.add_argument("--out", default="build/bench", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny models: checks the benchmark itself")
    parser.add_argument("--no-make-engine", action="store_true", help="skip timing `make engine`")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=BUDGET.seconds,
        help="seconds of extra rounds a group may spend while a target is unresolved (default %(default)g)",
    )
    args = parser.parse_args(argv)
    chosen = [m for m in args.models.split(",") if m]
    unknown = sorted(set(chosen) - set(everything))
    if unknown:
        parser.error(f"unknown --models {','.join(unknown)}; choose from {','.join(everything)}")
    try:
        run(
            [m for m in chosen if m != GENERATION],
            args.out,
            quick=args.quick,
            make_engine=not args.no_make_engine,
            generation=GENERATION in chosen,
            budget=Budget(seconds=args.budget_s),
        )
    except AimError as error:  # one line, as every command of the CLI says it
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
