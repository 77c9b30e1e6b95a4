"""aim trt-check model.onnx: which nodes TensorRT's ONNX parser would refuse, and why."""

from __future__ import annotations


def add(sub) -> None:
    p = sub.add_parser(
        "trt-check", help="check an ONNX file against TensorRT's ONNX operator matrix (no TensorRT needed)"
    )
    p.add_argument("input")
    p.add_argument("--backend", default="tensorrt", choices=("tensorrt", "tensorrt-rtx"))
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.graph_passes.trt_support import check_tensorrt_support

    report = check_tensorrt_support(args.input, backend=args.backend)
    print(report.summary())
    return 0 if report.ok else 1
