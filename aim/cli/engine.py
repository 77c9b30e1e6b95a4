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
        "--max-batch",
        type=shared.positive_int,
        help="the engine profile's largest batch, which Triton's max_batch_size follows (default: 32 for images; "
        "for text, what fits the KV cache of the longest sequence in 25%% of this machine's memory, at most 64)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the verified build in OUT/NAME if it was built as asked (weights or file, backend, precision, "
        "noise and key, largest batch if given) and every file still has its recorded hash; else build",
    )
    p.set_defaults(func=run)


def source_of(args):
    """The build source the arguments name: your ONNX, a model family (with a checkpoint's weights), or a
    checkpoint folder as its own architecture."""
    from aim.errors import AimError

    if args.onnx is None and args.model is None and args.checkpoint is None:
        raise AimError(
            "give a model family (`aim engine MODEL`, see `aim models`), a checkpoint folder (`aim engine "
            "--checkpoint DIR`) "
            "or your own ONNX (`aim engine --onnx yours.onnx --logits NAME`)"
        )
    if args.onnx is None:
        from aim.pipeline.model_source import model_source

        return model_source(args.model, args.checkpoint)
    if args.model is not None:
        raise AimError("give a model family or --onnx, not both: your ONNX is its own model")
    if args.checkpoint:
        raise AimError("--checkpoint is a family's weights; your --onnx carries its own")
    from aim.pipeline.onnx_source import OnnxSource
    from aim.runtime.shapes import ShapeRanges

    shapes = ShapeRanges.parse(args.min_shapes, args.opt_shapes, args.max_shapes)
    return OnnxSource(args.onnx, args.logits, args.class_axis, args.task, shapes, args.inputs, args.upsample_to)


def run(args) -> int:
    import sys

    from aim.contract import BATCH
    from aim.pipeline.builder import build, reusable
    from aim.pipeline.report import report
    from aim.pipeline.request import BuildRequest

    source = source_of(args)
    request = BuildRequest(
        args.out, args.backend, args.precision, args.noise, args.noise_key, args.seed, args.max_batch
    )
    built = reusable(source, request) if args.reuse else None
    if built is not None:  # said on stderr: the command that asked for the build may be printing its own output
        manifest = built.manifest
        print(
            f"reused {built.folder}: built as asked ({manifest.backend}, {manifest.precision}, "
            f"{manifest.modulation.noise} noise, batch up to {manifest.dynamic_dims[BATCH].max}), verified, every file "
            "as recorded",
            file=sys.stderr,
        )
        return 0
    print(report(build(source, request).manifest))
    return 0
