"""python -m aim.benchmarks [--models resnet,segformer,llama] [--out build/bench] [--quick] [--no-make-engine]"""

import argparse
from pathlib import Path

from aim.benchmarks.models import benchmarked
from aim.benchmarks.run import run


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m aim.benchmarks", description=__doc__)
    parser.add_argument("--models", default=",".join(benchmarked()), help="comma-separated families")
    parser.add_argument("--out", default="build/bench", type=Path)
    parser.add_argument("--quick", action="store_true", help="tiny models: checks the benchmark itself")
    parser.add_argument("--no-make-engine", action="store_true", help="skip P4 (timing make engine)")
    args = parser.parse_args(argv)
    run([m for m in args.models.split(",") if m], args.out, quick=args.quick, make_engine=not args.no_make_engine)


if __name__ == "__main__":
    main()
