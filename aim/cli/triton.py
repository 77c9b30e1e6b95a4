"""aim triton build/MODEL: Triton model repository entries for a build's engine (and its text model)."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("triton", help="write Triton model repository entries for a build's engine (tiered: --tiers)")
    p.add_argument("build", help="a build folder with manifest.json, e.g. build/resnet")
    p.add_argument("--repository", default="build/triton", help="model repository root (default: build/triton)")
    p.add_argument("--name", help="model name in Triton (default: the manifest's model)")
    p.add_argument("--engine", help="engine file in the build folder (default: the manifest's engine)")
    p.add_argument(
        "--tiers",
        help="the owner's tier table (JSON; `aim tiers key` adds keys): the model takes no utility, each request "
        "gets the tier of its key (Authorization: Bearer KEY), the default tier without one",
    )
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
    from aim.serving.triton import CONFIG, MAX_QUEUE_DELAY_US, TEXT_SUFFIX, write_model

    delay = MAX_QUEUE_DELAY_US if args.max_queue_delay_us is None else args.max_queue_delay_us
    common = dict(max_queue_delay_us=delay, instances=args.instances, threads=args.threads, tiers=args.tiers)
    if args.bare:
        common.pop("tiers")
        if args.tiers:
            from aim.errors import AimError

            raise AimError("--bare serves the bare model, which takes no tiers: leave out --tiers or --bare")
    manifest = Build.open(args.build, check=False).manifest
    folders = [write_model(args.build, args.repository, args.name, args.engine, bare=args.bare, **common)]
    if manifest.tokenizer and not args.bare:  # text in, text out beside the tensor model
        text_name = (args.name or manifest.model) + TEXT_SUFFIX
        folders.append(write_model(args.build, args.repository, text_name, args.engine, text=True, **common))
    for folder in folders:
        files = ", ".join(str(p.relative_to(folder)) for p in sorted(folder.glob("*/*")))
        print(f"wrote {folder}/{CONFIG} and {files}")
        print((folder / CONFIG).read_text())
    if args.tiers:
        print(
            f"tiered: the tier of each request comes from its key; the repository {args.repository} serves no utility"
        )
    if manifest.backend == "tensorrt-rtx":
        print(
            "note: this is a TensorRT for RTX plan: it runs where TensorRT for RTX runs it (an RTX GPU). For a "
            "data-centre GPU, build with BACKEND=tensorrt there."
        )
    return 0
