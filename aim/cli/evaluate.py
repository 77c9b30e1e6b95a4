"""aim eval MODEL and aim calibrate MODEL: the engine against the theory, and the level -> sigma table."""

from __future__ import annotations

from aim.cli import args as shared


def _common(p, model_nargs: str | None = None, model_help: str = "model family (see `aim models`)") -> None:
    p.add_argument("model", nargs=model_nargs, help=model_help)
    p.add_argument(
        "--checkpoint", help="a save_pretrained folder (default: the family's trained model, trained if needed)"
    )
    shared.out(p)
    shared.seed(p)


def add(sub) -> None:
    p = sub.add_parser("eval", help="utility and focus sweeps through the engine, measured vs predicted (CSV, plots)")
    _common(p)
    p.add_argument("--repeats", type=shared.positive_int, help="engine runs per sweep point (default: per family)")
    p.add_argument(
        "--boost",
        type=shared.non_negative_int,
        help="class to boost (default: the clean model's 2nd most frequent answer)",
    )
    p.add_argument(
        "--suppress", type=shared.non_negative_int, help="class to suppress (default: its most frequent answer)"
    )
    p.set_defaults(func=run_eval)
    p = sub.add_parser(
        "calibrate", help="invert G on calibration inputs: level -> sigma, and an engine taking utility_level"
    )
    _common(p, "?", "model family (see `aim models`), or with --data a build folder (OUT/NAME)")
    p.add_argument(
        "--data",
        metavar="UNLABELED.npy",
        help="your unlabelled inputs (.npy; .npz by input name) for a build folder or --onnx",
    )
    shared.onnx_source(p)
    p.set_defaults(func=run_calibrate)


def run_eval(args) -> int:
    from aim.evaluation.sweep import evaluate, report

    print(
        report(
            evaluate(
                args.model,
                args.out,
                args.checkpoint,
                args.repeats,
                boost=args.boost,
                suppress=args.suppress,
                seed=args.seed,
            )
        )
    )
    return 0


def run_calibrate(args) -> int:
    from pathlib import Path

    from aim.errors import AimError
    from aim.evaluation.calibrate import calibrate, report

    if args.onnx is not None or args.data is not None:
        from aim.evaluation.calibrate_data import calibrate_build, calibrate_onnx
        from aim.runtime.shapes import ShapeRanges

        if args.data is None or (args.onnx is None) == (args.model is None):
            raise AimError(
                "calibrate your own model with --data UNLABELED.npy and either a build folder (`aim calibrate "
                "OUT/NAME --data ...`) or --onnx FILE"
            )
        if args.onnx is None:
            entry = calibrate_build(args.model, args.data, args.seed)
        else:
            shapes = ShapeRanges.parse(args.min_shapes, args.opt_shapes, args.max_shapes)
            entry = calibrate_onnx(
                args.onnx,
                args.data,
                args.out,
                args.seed,
                logits=args.logits,
                class_axis=args.class_axis,
                task=args.task,
                shapes=shapes,
                inputs=args.inputs,
                upsample_to=args.upsample_to,
            )
    elif args.model is None or Path(args.model).is_dir():
        raise AimError(
            "give a model family (`aim calibrate MODEL`), or your unlabelled inputs with --data UNLABELED.npy "
            "and a build folder or --onnx FILE"
        )
    else:
        entry = calibrate(args.model, args.out, args.checkpoint, seed=args.seed)
    print(report(entry))
    return 0
