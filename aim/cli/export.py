"""aim export [MODEL] -o model.onnx [--checkpoint DIR]: trace a family, or a checkpoint folder's own
architecture, to ONNX."""

from __future__ import annotations

from aim.cli import args as shared


def add(sub) -> None:
    p = sub.add_parser("export", help="trace a model family (or, without one, --checkpoint's architecture) to ONNX")
    p.add_argument("model", nargs="?")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--checkpoint")
    shared.seed(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from aim.errors import AimError
    from aim.files import check_file_replaceable
    from aim.pipeline import steps
    from aim.pipeline.model_source import model_source
    from aim.tasks import get_task

    if Path(args.output).is_dir():
        raise AimError(f"-o {args.output} is a folder: give the path of the ONNX file to write")
    check_file_replaceable(args.output)  # a device, a pipe: refused before the export, not after it
    family = model_source(args.model, args.checkpoint).family
    task = get_task(family.task)
    loaded = steps.load(family, task, args.checkpoint, args.seed)
    path = steps.export(family, task, loaded.model, Path(args.output))
    print(f"exported {family.name} to {path}")
    return 0
