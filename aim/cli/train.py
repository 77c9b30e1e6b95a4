"""aim train MODEL: train the family's small model on package-shipped data (cached)."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("train", help="train a family's small model on package-shipped data (cached)")
    p.add_argument("model")
    p.add_argument("--out", help="checkpoint folder (default: build/trained/MODEL)")
    p.add_argument("--steps", type=shared.positive_int, help="optimiser steps (default: the family's recipe)")
    shared.seed(p)
    p.add_argument("--force", action="store_true", help="retrain even if a checkpoint with these settings exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.evaluation.train import train

    result = train(args.model, args.out, args.steps, args.seed, args.force)
    print(
        f"{args.model}: clean {result['metric']} {result['clean_metric']:.4f} on {result['test_samples']} test "
        "samples, "
        f"trained in {result['train_seconds']} s; checkpoint {result['checkpoint']}"
    )
    return 0
