"""aim engine MODEL | --onnx FILE: export (or your ONNX) -> passes -> engine -> verify, into OUT/NAME/."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("engine", help="the whole pipeline for one model family (or your own ONNX), into OUT/NAME/")
    p.add_argument("model", nargs="?", help="model family (see `aim models`); or --onnx FILE")
    p.add_argument("--checkpoint", help="a local save_pretrained folder (default: tiny config, random weights)")
    shared.out(p)
    shared.backend(p)
    shared.precision(p)
    shared.seed(p)
    shared.onnx_source(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.errors import AimError
    from aim.pipeline.build import build_model
    from aim.pipeline.report import report

    if (args.model is None) == (args.onnx is None):
        raise AimError("give a model family (`aim engine MODEL`, see `aim models`) or your own ONNX (`aim engine --onnx yours.onnx --logits NAME`), one of the two")
    if args.onnx is not None:
        if args.checkpoint:
            raise AimError("--checkpoint is a family's weights; your --onnx carries its own")
        from aim.pipeline.onnx_source import build_onnx
        from aim.runtime.shapes import ShapeRanges

        shapes = ShapeRanges.parse(args.min_shapes, args.opt_shapes, args.max_shapes)
        manifest = build_onnx(
            args.onnx, args.logits, args.out, args.class_axis, args.task, shapes, args.inputs, args.backend, args.precision, args.seed
        )
    else:
        manifest = build_model(args.model, args.out, args.checkpoint, args.backend, args.seed, precision=args.precision)
    print(report(manifest))
    return 0
