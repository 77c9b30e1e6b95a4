"""aim build modulated.onnx -o engine.onnx|engine.plan: one engine file from one ONNX file (no build folder)."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("build", help="build an engine from an ONNX file (ONNX Runtime, or a TensorRT plan)")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt", "tensorrt-rtx"))
    p.add_argument(
        "--model", help="TensorRT: the family whose dims' ranges make the optimization profile (or the shape flags)"
    )
    shared.shapes(p)
    shared.threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.backend == "onnxruntime":
        from aim.runtime.onnxruntime import build

        print(f"built ONNX Runtime engine {build(args.input, args.output, args.threads)}")
        return 0
    from aim.errors import AimError
    from aim.families import get_family
    from aim.graph_passes.trt_support import check_tensorrt_support
    from aim.layout import GraphIO
    from aim.runtime.base import profile_from_io
    from aim.runtime.shapes import ShapeRanges
    from aim.runtime.tensorrt import build_engine

    shapes = ShapeRanges.parse(args.min_shapes, args.opt_shapes, args.max_shapes)
    if bool(args.model) == bool(shapes):
        raise AimError(
            "a TensorRT engine needs the range of every dynamic dim: pass the shapes of the inputs "
            "(--min-shapes/--opt-shapes/--max-shapes NAME:1x3x224x224, trtexec's spelling), or --model "
            "FAMILY, whose dims' ranges make the profile; one of the two"
        )
    check_tensorrt_support(args.input, backend=args.backend).raise_if_unsupported(args.input)
    inputs = GraphIO.of(args.input).inputs
    profile = shapes.profile(inputs) if shapes else profile_from_io(inputs, get_family(args.model).dims)
    result = build_engine(args.input, args.output, args.backend, profile)
    print(
        f"built {args.backend} {result.version} engine {result.path}: {result.bytes / 1e6:.1f} MB in "
        f"{result.seconds:.1f} s"
    )
    for name, shapes in result.profile.items():
        print(f"  profile {name}: min {shapes['min']}, opt {shapes['opt']}, max {shapes['max']}")
    return 0
