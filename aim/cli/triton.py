"""aim triton build/MODEL: a Triton model repository entry for a build's engine."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("triton", help="write a Triton model repository entry for a build's engine")
    p.add_argument("build", help="a build folder with manifest.json, e.g. build/resnet")
    p.add_argument("--repository", default="build/triton", help="model repository root (default: build/triton)")
    p.add_argument("--name", help="model name in Triton (default: the manifest's model)")
    p.add_argument("--engine", help="engine file in the build folder (default: the manifest's engine)")
    p.add_argument(
        "--max-queue-delay-us",
        type=shared.non_negative_int,
        help="how long dynamic batching waits for more requests (default: 2000)",
    )
    p.add_argument(
        "--instances",
        type=shared.positive_int,
        help="model instances (instance_group count; default: on a CPU, the cores up to 4; on a GPU, 1)",
    )
    p.add_argument(
        "--threads", type=shared.positive_int, help="ONNX Runtime threads per instance (default: cores / instances)"
    )
    p.add_argument(
        "--bare",
        action="store_true",
        help="serve the build's bare model (no utility, focus) as MODEL-bare: the baseline of `make loadtest`",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from aim.runtime.folder import Build
    from aim.serving.triton import CONFIG, MAX_QUEUE_DELAY_US, write_model

    delay = MAX_QUEUE_DELAY_US if args.max_queue_delay_us is None else args.max_queue_delay_us
    folder = write_model(
        args.build, args.repository, args.name, args.engine, delay, args.instances, args.threads, args.bare
    )
    print(f"wrote {folder}/{CONFIG} and {', '.join(str(p.relative_to(folder)) for p in sorted(folder.glob('*/*')))}")
    print((folder / CONFIG).read_text())
    if Build.open(args.build, check=False).manifest.backend == "tensorrt-rtx":
        print(
            "note: this is a TensorRT for RTX plan: it runs where TensorRT for RTX runs it (an RTX GPU). Triton's "
            "tensorrt backend runs plans of the TensorRT version it was built with; for a data-centre Triton, "
            "build with BACKEND=tensorrt there."
        )
    return 0
