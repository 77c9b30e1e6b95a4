"""aim engine [MODEL] [--checkpoint DIR]: export -> passes -> engine -> verify, into OUT/MODEL/, or without
MODEL into OUT/<the checkpoint folder's name>/ (its architecture and task read from its config.json)."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("engine", help="the whole pipeline for one model family or checkpoint folder, into OUT/MODEL/")
    p.add_argument("model", nargs="?", help="model family (see `aim models`); leave it out to build --checkpoint as its own architecture")
    p.add_argument(
        "--checkpoint",
        help="a local save_pretrained folder (default: the family's tiny config, random weights); without MODEL, built into OUT/<folder name>",
    )
    shared.out(p)
    shared.backend(p)
    shared.precision(p)
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.pipeline.build import build_model
    from aim.pipeline.report import report

    manifest = build_model(args.model, args.out, args.checkpoint, args.backend, args.seed, precision=args.precision)
    print(report(manifest))
    return 0
