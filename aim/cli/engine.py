"""aim engine MODEL: export -> passes -> engine -> verify, into OUT/MODEL/."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("engine", help="the whole pipeline for one model family, into OUT/MODEL/")
    p.add_argument("model", help="model family (see `aim models`)")
    p.add_argument("--checkpoint", help="a local save_pretrained folder (default: tiny config, random weights)")
    shared.out(p)
    shared.backend(p)
    shared.precision(p)
    shared.noise(p)
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.pipeline.build import build_model
    from aim.pipeline.report import report

    manifest = build_model(
        args.model, args.out, args.checkpoint, args.backend, args.seed, precision=args.precision, noise=args.noise, noise_key=args.noise_key
    )
    print(report(manifest))
    return 0
