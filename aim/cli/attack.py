"""aim attack MODEL: the averaging attack on fresh and keyed noise (CSV, plot, summary)."""

from __future__ import annotations

from aim.cli import args as shared
from aim.evaluation.attack_keys import KEYS


def add(sub) -> None:
    p = sub.add_parser(
        "attack", help="repeat a request K times and average: what a client gains against fresh and keyed noise"
    )
    p.add_argument("model")
    p.add_argument(
        "--checkpoint", help="a save_pretrained folder (default: the family's trained model, trained if needed)"
    )
    p.add_argument(
        "--noise-key",
        metavar="FILE",
        help="the key of the keyed engine (default: a fresh one; written there if the file does not exist)",
    )
    p.add_argument(
        "--inputs", type=shared.positive_int, help="test inputs to attack (default: the family's evaluation set)"
    )
    p.add_argument(
        "--kinds",
        nargs="*",
        metavar="KIND",
        help="kinds of perturbed repeats (default: all; images levels-1 levels-4 levels-16 optimised-4, text "
        "whitespace case synonym; none given: exact repeats only)",
    )
    p.add_argument(
        "--keys",
        type=shared.positive_int,
        default=KEYS,
        help=f"keys one query's keyed agreement is measured under, against the theory (default {KEYS}; the "
        "standard error comes from their spread, since inputs that share a draw make one key's figure stray)",
    )
    shared.out(p)
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.evaluation.attack import attack, report

    print(
        report(
            attack(
                args.model,
                args.out,
                args.checkpoint,
                args.noise_key,
                args.inputs,
                args.seed,
                kinds=args.kinds,
                keys=args.keys,
            )
        )
    )
    return 0
