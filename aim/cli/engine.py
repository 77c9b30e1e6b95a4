"""aim engine [MODEL] [--checkpoint DIR] | --onnx FILE: export (or your ONNX) -> passes -> engine -> verify,
into OUT/MODEL/, or without MODEL into OUT/<the checkpoint folder's name>/ (its architecture and task read
from its config.json), or OUT/<the ONNX file's stem>/."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser(
        "engine", help="the whole pipeline for a model family, a checkpoint folder or your own ONNX, into OUT/NAME/"
    )
    p.add_argument(
        "model",
        nargs="?",
        help="model family (see `aim models`); leave it out to build --checkpoint as its own architecture, or "
        "give --onnx",
    )
    p.add_argument(
        "--checkpoint",
        help="a local save_pretrained folder (default: the family's tiny config, random weights); without "
        "MODEL, built into OUT/<folder name>",
    )
    shared.out(p)
    shared.backend(p)
    shared.precision(p)
    shared.noise(p)
    shared.seed(p)
    shared.onnx_source(p)
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the verified build in OUT/NAME if it was built as asked (weights, backend, precision, "
        "noise and key); else build",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.errors import AimError
    from aim.pipeline.build import build_model
    from aim.pipeline.report import report

    if args.onnx is None and args.model is None and args.checkpoint is None:
        raise AimError(
            "give a model family (`aim engine MODEL`, see `aim models`), a checkpoint folder (`aim engine "
            "--checkpoint DIR`) "
            "or your own ONNX (`aim engine --onnx yours.onnx --logits NAME`)"
        )
    if args.reuse and args.onnx is None:
        import sys

        from aim.pipeline.build import reusable_build

        built = reusable_build(
            args.model, args.out, args.checkpoint, args.backend, args.precision, args.noise, args.noise_key, args.seed
        )
        if built is not None:  # said on stderr: the command that asked for the build may be printing its own output
            print(
                f"reused {built.folder}: built as asked ({built.backend}, {built.precision}, "
                f"{built.modulation.noise} noise), verified",
                file=sys.stderr,
            )
            return 0
    if args.onnx is not None:
        if args.reuse:
            raise AimError("--reuse is for a model family or a checkpoint folder; your --onnx is built again each time")
        if args.model is not None:
            raise AimError("give a model family or --onnx, not both: your ONNX is its own model")
        if args.checkpoint:
            raise AimError("--checkpoint is a family's weights; your --onnx carries its own")
        from aim.pipeline.onnx_source import build_onnx
        from aim.runtime.shapes import ShapeRanges

        shapes = ShapeRanges.parse(args.min_shapes, args.opt_shapes, args.max_shapes)
        manifest = build_onnx(
            args.onnx,
            args.logits,
            args.out,
            args.class_axis,
            args.task,
            shapes,
            args.inputs,
            args.backend,
            args.precision,
            args.seed,
            noise=args.noise,
            noise_key=args.noise_key,
            upsample_to=args.upsample_to,
        )
    else:
        manifest = build_model(
            args.model,
            args.out,
            args.checkpoint,
            args.backend,
            args.seed,
            precision=args.precision,
            noise=args.noise,
            noise_key=args.noise_key,
        )
    print(report(manifest))
    return 0
